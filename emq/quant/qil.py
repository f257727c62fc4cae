"""QIL, quantization-interval learning (Jung et al., CVPR 2019).

A learnable interval per layer, centre ``c`` and half-width ``d``: weights with ``|w| < c - d``
are pruned to 0, those with ``|w| > c + d`` clipped to 1, and those between transformed as
``(alpha |w| + beta)^gamma`` with ``alpha = 0.5 / d``, ``beta = -0.5 c / d + 0.5``, the sign
restored; activations are ``clamp(alpha x + beta, 0, 1)``. The transformed values are then
discretised uniformly with a straight-through rounding; ``c``, ``d`` and ``gamma`` are trained by
the task loss, their gradient scaled by ``1/sqrt(N)`` (N: elements of the tensor).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from emq.quant.quantizers import FULL_PRECISION, check_bits
from emq.quant.ste import round_ste, scale_grad


def qil_transform_weight(w: torch.Tensor, c: torch.Tensor, d: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The interval transform of the weights into [-1, 1] (before discretisation)."""
    d = d.abs().clamp_min(1e-4)
    alpha, beta = 0.5 / d, -0.5 * c / d + 0.5
    inside = (alpha * w.abs() + beta).clamp(0.0, 1.0) ** gamma
    return torch.sign(w) * inside


def qil_transform_activation(x: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The interval transform of the activations into [0, 1] (gamma = 1)."""
    d = d.abs().clamp_min(1e-4)
    return torch.clamp(0.5 / d * x - 0.5 * c / d + 0.5, 0.0, 1.0)


def qil_discretise(v: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Uniform discretisation with ``q = 2^(b-1) - 1`` signed levels per side, or ``2^b - 1`` unsigned."""
    check_bits(bits)
    if bits == FULL_PRECISION:
        return v
    q = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    if q == 0:  # 1-bit signed: the sign alone
        return torch.sign(v) + (v - v.detach())
    return round_ste(v * q) / q


class QILQuantizer(nn.Module):
    """Learnable ``c``, ``d`` (and ``gamma`` for weights), shared by all bit-widths of a layer."""

    def __init__(self, signed: bool, c: float = 0.5, d: float = 0.5, gamma: float = 1.0):
        super().__init__()
        self.signed = signed
        self.c = nn.Parameter(torch.tensor(c))
        self.d = nn.Parameter(torch.tensor(d))
        self.gamma = nn.Parameter(torch.tensor(gamma)) if signed else None

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        # The gradient of c, d and gamma sums over every element of x; scaled by 1/sqrt(N) as LSQ
        # scales its step (our choice: QIL trains them at their own learning rate, not given in
        # METHOD.md), or a layer's interval diverges at the weights' learning rate.
        g = 1.0 / math.sqrt(x.numel())
        c, d = scale_grad(self.c, g), scale_grad(self.d, g)
        if self.signed:
            v = qil_transform_weight(x, c, d, scale_grad(self.gamma, g))
        else:
            v = qil_transform_activation(x, c, d)
        return qil_discretise(v, bits, self.signed)
