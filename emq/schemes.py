"""Quantization schemes by name: a config names one for the weights and one for the
activations, and this builds the module each layer calls as ``quantizer(x, bits)``.

``dorefa`` (METHOD.md §1) is stateless and built into the layers, so it maps to ``None``; the
others hold learnable parameters (LSQ steps, QIL intervals, a Double Rounding scale).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .double_rounding import double_rounding
from .lsq import LSQQuantizer
from .qil import QILQuantizer
from .quantizers import FULL_PRECISION
from .shiftbit import shift_hard, shift_soft


class ShiftQuantizer(nn.Module):
    """Power-of-two weights: the soft staircase at ``steepness`` while training, hard in eval.
    The training loop may raise ``steepness`` over training (the shift-bit schedule)."""

    def __init__(self, steepness: float = 10.0):
        super().__init__()
        self.register_buffer("steepness", torch.tensor(float(steepness)))

    def forward(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FULL_PRECISION:
            return w
        return shift_soft(w, bits, float(self.steepness)) if self.training else shift_hard(w, bits)


class DoubleRoundingQuantizer(nn.Module):
    """One learned scale ``s_h`` at the highest trained precision ``h``; lower precisions by a
    second rounding of the int-h weights. The scale starts at ``max|W| / (2^(h-1) - 1)``."""

    def __init__(self, high: int):
        super().__init__()
        self.high = high
        self.scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FULL_PRECISION:
            return w
        if not self.initialised:
            with torch.no_grad():
                self.scale.copy_(w.abs().max().clamp_min(1e-8) / (2 ** (self.high - 1) - 1))
            self.initialised.fill_(True)
        return double_rounding(w, self.scale, self.high, bits)


def _highest(bits: tuple[int, ...]) -> int:
    below = [b for b in bits if b != FULL_PRECISION]
    if not below:
        raise ValueError("double_rounding needs at least one trained bit-width below 32")
    return max(below)


WEIGHT_SCHEMES: dict[str, Callable[[tuple[int, ...]], nn.Module | None]] = {
    "dorefa": lambda bits: None,
    "lsq": lambda bits: LSQQuantizer(bits, signed=True),
    "qil": lambda bits: QILQuantizer(signed=True),
    "shift": lambda bits: ShiftQuantizer(),
    "double_rounding": lambda bits: DoubleRoundingQuantizer(_highest(bits)),
}
ACT_SCHEMES: dict[str, Callable[[tuple[int, ...]], nn.Module | None]] = {
    "dorefa": lambda bits: None,
    "lsq": lambda bits: LSQQuantizer(bits, signed=False),
    "qil": lambda bits: QILQuantizer(signed=False),
}


def make_weight_quantizer(name: str, bits: tuple[int, ...]) -> nn.Module | None:
    if name not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown weight quantizer {name!r}: use one of {', '.join(WEIGHT_SCHEMES)}")
    return WEIGHT_SCHEMES[name](bits)


def make_act_quantizer(name: str, bits: tuple[int, ...]) -> nn.Module | None:
    if name not in ACT_SCHEMES:
        raise ValueError(f"unknown activation quantizer {name!r}: use one of {', '.join(ACT_SCHEMES)}")
    return ACT_SCHEMES[name](bits)
