"""Straight-through gradient helpers shared by the quantizers: rounding and gradient scaling."""
from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``g`` in the backward pass."""
    return (x - x * g).detach() + x * g
