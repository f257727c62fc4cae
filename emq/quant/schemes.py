"""Quantization schemes by name: a config names one for the weights and one for the
activations, and this builds the module each layer calls as ``quantizer(x, bits)``.

Every scheme is a module called as ``quantizer(x, bits)``: ``dorefa`` (METHOD.md §1) holds no
state; the others hold learnable parameters (LSQ steps, QIL intervals, a Double Rounding scale).
A quantizer whose shape changes over training (shift-bit's steepness) is a
:class:`ScheduledQuantizer`: the training loop calls :func:`advance_schedules` before every step.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from emq.config import register
from emq.quant.double_rounding import double_rounding, int_range
from emq.quant.lsq import LSQQuantizer
from emq.quant.qil import QILQuantizer
from emq.quant.quantizers import FULL_PRECISION, quantize_activation, quantize_weight
from emq.quant.shiftbit import shift_hard, shift_scaled, steepness_at
from emq.quant.ste import scale_grad


class DoReFaWeight(nn.Module):
    """DoReFa's ``Q_b(W)`` (:func:`emq.quant.quantizers.quantize_weight`), scaled by ``mean|W|`` if asked."""

    def __init__(self, scale_by_mean: bool = False):
        super().__init__()
        self.scale_by_mean = scale_by_mean

    def forward(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        return quantize_weight(w, bits, self.scale_by_mean)


class DoReFaAct(nn.Module):
    """DoReFa's ``q_b(x)`` (:func:`emq.quant.quantizers.quantize_activation`)."""

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        return quantize_activation(x, bits)


class ScheduledQuantizer(nn.Module):
    """A quantizer with a schedule: ``at_step(step, total)`` sets it for training step ``step`` of ``total``."""

    def at_step(self, step: int, total: int) -> None:
        raise NotImplementedError


def advance_schedules(model: nn.Module, step: int, total: int) -> None:
    """Set every scheduled quantizer of ``model`` for training step ``step`` of ``total``."""
    for m in model.modules():
        if isinstance(m, ScheduledQuantizer):
            m.at_step(step, total)


class ShiftQuantizer(ScheduledQuantizer):
    """Power-of-two weights: the gradient-scaled soft staircase at ``steepness`` while training,
    hard in eval. Its schedule raises ``steepness`` geometrically from ``start`` to ``end``
    (:func:`emq.quant.shiftbit.steepness_at`; ``end`` None: constant)."""

    def __init__(self, steepness: float = 10.0, end: float | None = None):
        super().__init__()
        self.register_buffer("steepness", torch.tensor(float(steepness)))
        self.start, self.end = steepness, steepness if end is None else end

    def at_step(self, step: int, total: int) -> None:
        self.steepness.fill_(steepness_at(self.start, self.end, step, total))

    def forward(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FULL_PRECISION:
            return w
        return shift_scaled(w, bits, float(self.steepness)) if self.training else shift_hard(w, bits)


class DoubleRoundingQuantizer(nn.Module):
    """One learned scale ``s_h`` at the highest trained precision ``h``; lower precisions by a
    second rounding of the int-h weights. The scale starts at ``max|W| / (2^(h-1) - 1)``.

    Precision ``l`` quantizes with the step ``s_l = s_h 2^(h-l)``, so its gradient on ``s_h`` is
    ``2^(h-l)`` times its gradient on ``s_l``, and an SGD step on ``s_h`` moves ``s_l`` by
    ``4^(h-l)`` times what it would move a step of its own: the low precisions dominate the shared
    scale and, unscaled, make it diverge. Without ``alrs`` the gradient of ``s_h`` is scaled by
    LSQ's ``1 / sqrt(N Q_P(h))`` for every precision. With Adaptive Learning Rate Scaling the
    gradient from precision ``l`` is scaled by ``1 / (sqrt(N Q_P(l)) 4^(h-l))``, so that each
    precision moves its step ``s_l`` as LSQ would move a step of its own. METHOD.md §5 names ALRS
    but not its formula: this per-precision rule is our choice.
    """

    def __init__(self, high: int, alrs: bool = False):
        super().__init__()
        self.high, self.alrs = high, alrs
        self.scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FULL_PRECISION:
            return w
        if not self.initialised:
            with torch.no_grad():
                self.scale.copy_(w.abs().max().clamp_min(1e-8) / (2 ** (self.high - 1) - 1))
            self.initialised.fill_(True)
        return double_rounding(w, scale_grad(self.scale, self.grad_scale(w.numel(), bits)), self.high, bits)

    def grad_scale(self, numel: int, bits: int) -> float:
        """The factor on the gradient of ``s_h`` coming from precision ``bits``."""
        if not self.alrs:
            return 1.0 / math.sqrt(numel * int_range(self.high)[1])
        return 1.0 / (math.sqrt(numel * max(int_range(bits)[1], 1)) * 4 ** (self.high - bits))


def _highest(bits: tuple[int, ...]) -> int:
    below = [b for b in bits if b != FULL_PRECISION]
    if not below:
        raise ValueError("double_rounding needs at least one trained bit-width below 32")
    return max(below)


# A builder takes the trained bit-widths and the quant config (for scheme options).
WEIGHT_SCHEMES: dict[str, Callable[..., nn.Module]] = {
    "dorefa": lambda bits, q: DoReFaWeight(q.scale_by_mean),
    "lsq": lambda bits, q: LSQQuantizer(bits, signed=True),
    "qil": lambda bits, q: QILQuantizer(signed=True),
    "shift": lambda bits, q: ShiftQuantizer(q.steepness_start, q.steepness_end),
    "double_rounding": lambda bits, q: DoubleRoundingQuantizer(_highest(bits), q.alrs),
}
ACT_SCHEMES: dict[str, Callable[..., nn.Module]] = {
    "dorefa": lambda bits, q: DoReFaAct(),
    "lsq": lambda bits, q: LSQQuantizer(bits, signed=False),
    "qil": lambda bits, q: QILQuantizer(signed=False),
}

# The lowest bit-width each weight scheme has a level set for, and why (32 always works).
MIN_WEIGHT_BITS: dict[str, tuple[int, str]] = {
    "dorefa": (1, ""),
    "lsq": (2, "signed LSQ at 1 bit has Q_P = 0, no positive level"),
    "qil": (1, ""),
    "shift": (2, "shift-bit levels need a sign bit and at least one magnitude bit"),
    "double_rounding": (2, "a signed integer grid needs 2 bits or more"),
}


def check_scheme_bits(name: str, bits: int) -> None:
    """A one-line ValueError if weight scheme ``name`` has no level set at ``bits``."""
    low, why = MIN_WEIGHT_BITS[name]
    if bits != FULL_PRECISION and bits < low:
        raise ValueError(f"weight quantizer {name!r} cannot do {bits}-bit: {why}")


register("quant.weight_quantizer", WEIGHT_SCHEMES)
register("quant.act_quantizer", ACT_SCHEMES)
register("scheme bits", check_scheme_bits)


def make_weight_quantizer(q, bits: tuple[int, ...]) -> nn.Module:
    """The weight quantizer module of ``q.weight_quantizer``."""
    if q.weight_quantizer not in WEIGHT_SCHEMES:
        raise ValueError(f"unknown weight quantizer {q.weight_quantizer!r}: use one of {', '.join(WEIGHT_SCHEMES)}")
    return WEIGHT_SCHEMES[q.weight_quantizer](bits, q)


def make_act_quantizer(q, bits: tuple[int, ...]) -> nn.Module:
    """The activation quantizer module of ``q.act_quantizer``."""
    if q.act_quantizer not in ACT_SCHEMES:
        raise ValueError(f"unknown activation quantizer {q.act_quantizer!r}: use one of {', '.join(ACT_SCHEMES)}")
    return ACT_SCHEMES[q.act_quantizer](bits, q)
