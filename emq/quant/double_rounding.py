"""Double Rounding (Huang et al., "Nearly Lossless Adaptive Bit Switching").

Only the highest precision ``h`` is stored, as integers ``W_h = clamp(round(W / s_h))`` with a
learned scale ``s_h``; a lower precision ``l`` is a second rounding of those integers,
``W_l = round(W_h / 2^(h-l))``, with scale ``s_h 2^(h-l)``. So one int-h tensor serves every
precision, and the model is stored in ``h`` bits per weight instead of 32.
"""
from __future__ import annotations

import torch

from emq.quant.quantizers import check_bits
from emq.quant.ste import round_ste


def int_range(bits: int) -> tuple[int, int]:
    """Signed integer range ``(-2^(b-1), 2^(b-1) - 1)``."""
    check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def to_int_high(w: torch.Tensor, scale_h: torch.Tensor, high: int) -> torch.Tensor:
    """``W_h = clamp(round(W / s_h), -2^(h-1), 2^(h-1) - 1)`` (float tensor of integers, STE)."""
    lo, hi = int_range(high)
    return torch.clamp(round_ste(w / scale_h), lo, hi)


def lower_from_high(w_int_h: torch.Tensor, high: int, low: int) -> torch.Tensor:
    """``W_l = clamp(round(W_h / 2^(h-l)))``: the second rounding, on integers (STE)."""
    if low > high:
        raise ValueError(f"double rounding derives lower precisions from {high}-bit, not {low}-bit")
    lo, hi = int_range(low)
    return torch.clamp(round_ste(w_int_h / 2 ** (high - low)), lo, hi)


def double_rounding(w: torch.Tensor, scale_h: torch.Tensor, high: int, bits: int) -> torch.Tensor:
    """The weight at ``bits`` (<= ``high``): ``W_l * s_h * 2^(h-l)``."""
    w_h = to_int_high(w, scale_h, high)
    return lower_from_high(w_h, high, bits) * (scale_h * 2 ** (high - bits))
