"""Multi-bit layers: one set of float weights, bit-width switched at run time.

Each layer that depends on the bit-width holds a ``bits`` attribute; ``set_bits(model, b)``
switches the whole model. The quantization formulas live in :mod:`emq.quant.quantizers`.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from emq.config import register
from emq.quant.quantizers import FULL_PRECISION, check_bits, correct_weight_bias, quantize_activation, quantize_weight


class MultiBit(nn.Module):
    """Base of every module whose forward pass depends on the current bit-width."""

    bits: int = FULL_PRECISION

    def set_bits(self, bits: int) -> None:
        self.bits = check_bits(bits)


class QuantWeightMixin(MultiBit):
    """Effective weight ``W_b``: ``Q_b(W)``, bias-corrected towards ``Q_32(W)`` for b < 32.

    ``Q_b`` is the ``weight_quantizer`` module of the config's scheme (:mod:`emq.quant.schemes`),
    called as ``weight_quantizer(W, b)``; a layer never configured quantizes with DoReFa (METHOD.md §1).
    """

    correction: str = "none"
    detach_stats: bool = True
    scale_by_mean: bool = False

    def configure(self, correction: str, detach_stats: bool, scale_by_mean: bool,
                  weight_quantizer: nn.Module | None = None) -> None:
        self.correction, self.detach_stats, self.scale_by_mean = correction, detach_stats, scale_by_mean
        if weight_quantizer is not None:
            self.weight_quantizer = weight_quantizer  # a submodule: its parameters are the layer's

    def _quantize(self, bits: int) -> torch.Tensor:
        # Looked up among the submodules: a class-level default would shadow the registered one.
        quantizer = self._modules.get("weight_quantizer")
        if quantizer is None:
            return quantize_weight(self.weight, bits, self.scale_by_mean)
        return quantizer(self.weight, bits)

    def effective_weight(self, bits: int | None = None) -> torch.Tensor:
        bits = self.bits if bits is None else check_bits(bits)
        q = self._quantize(bits)
        if bits == FULL_PRECISION or self.correction == "none":
            return q
        return correct_weight_bias(q, self._quantize(FULL_PRECISION), self.correction, self.detach_stats)


class QConv2d(nn.Conv2d, QuantWeightMixin):
    """Conv2d whose weight is quantized to the current bit-width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class QLinear(nn.Linear, QuantWeightMixin):
    """Linear layer whose weight is quantized to the current bit-width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


# quant.fp_act: the activation of QAct at 32 bits
FP_ACTS = ("relu", "clamp")
register("quant.fp_act", FP_ACTS)


class QAct(MultiBit):
    """Activation: ``q_b(x)`` for b < 32; at 32 bits ``fp_act`` ("relu" or "clamp" to [0, 1]).

    With the ``quantizer`` module of a scheme (:mod:`emq.quant.schemes`), b < 32 uses it instead.
    """

    def __init__(self, fp_act: str = "relu", quantizer: nn.Module | None = None):
        super().__init__()
        if fp_act not in FP_ACTS:
            raise ValueError(f"unknown full-precision activation {fp_act!r}: use relu or clamp")
        self.fp_act = fp_act
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == FULL_PRECISION:
            return F.relu(x) if self.fp_act == "relu" else quantize_activation(x, FULL_PRECISION)
        if self.quantizer is not None:
            return self.quantizer(x, self.bits)
        return quantize_activation(x, self.bits)

    def extra_repr(self) -> str:
        return f"fp_act={self.fp_act}"


def nearest_trained(trained_bits: Iterable[int], bits: int) -> int:
    """The trained bit-width whose norm a switchable norm uses at ``bits``: the nearest, ties to the higher."""
    return min(trained_bits, key=lambda t: (abs(t - bits), -t))


class SwitchableBatchNorm2d(MultiBit):
    """One BatchNorm2d per trained bit-width (the Any-Precision baseline).

    A bit-width that was not trained uses the BN of the nearest trained one (ties go to the
    higher); ``bn_for(bits)`` says which.
    """

    def __init__(self, num_features: int, bits: Iterable[int]):
        super().__init__()
        self.trained_bits = sorted({check_bits(b) for b in bits})
        self.bns = nn.ModuleDict({str(b): nn.BatchNorm2d(num_features) for b in self.trained_bits})

    def bn_for(self, bits: int) -> nn.BatchNorm2d:
        return self.bns[str(nearest_trained(self.trained_bits, bits))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_for(self.bits)(x)


# quant.norm: the norms make_norm and make_layer_norm build
NORMS = ("switchable", "shared")
register("quant.norm", NORMS)


def make_norm(kind: str, num_features: int, bits: Iterable[int]) -> nn.Module:
    """BatchNorm for a quantized layer: ``shared`` (one for all bit-widths) or ``switchable``."""
    if kind == "shared":
        return nn.BatchNorm2d(num_features)
    if kind == "switchable":
        return SwitchableBatchNorm2d(num_features, bits)
    raise ValueError(f"unknown norm {kind!r}: use shared or switchable")


class SwitchableLayerNorm(MultiBit):
    """One LayerNorm (gain and bias) per trained bit-width (the transformer's switchable norm); an
    untrained bit-width uses the nearest trained one (:func:`nearest_trained`)."""

    def __init__(self, shape, bits: Iterable[int], eps: float = 1e-6):
        super().__init__()
        self.trained_bits = sorted({check_bits(b) for b in bits})
        self.norms = nn.ModuleDict({str(b): nn.LayerNorm(shape, eps=eps) for b in self.trained_bits})

    def norm_for(self, bits: int) -> nn.LayerNorm:
        return self.norms[str(nearest_trained(self.trained_bits, bits))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_for(self.bits)(x)


def make_layer_norm(kind: str, shape, bits: Iterable[int], eps: float = 1e-6) -> nn.Module:
    """LayerNorm of a multi-bit transformer: ``shared`` (one for all bit-widths) or ``switchable``."""
    if kind == "shared":
        return nn.LayerNorm(shape, eps=eps)
    if kind == "switchable":
        return SwitchableLayerNorm(shape, bits, eps)
    raise ValueError(f"unknown norm {kind!r}: use shared or switchable")


def set_bits(model: nn.Module, bits: int, act_bits: int | None = None) -> nn.Module:
    """Switch every multi-bit module of ``model`` to ``bits``; returns the model.

    With ``act_bits`` the activations run at that bit-width instead (e.g. 32: weights
    quantized, activations full precision, the first stage of progressive quantization).
    """
    check_bits(bits)
    act_bits = bits if act_bits is None else check_bits(act_bits)
    for m in model.modules():
        if isinstance(m, MultiBit):
            m.set_bits(act_bits if isinstance(m, QAct) else bits)
    return model


def active_norms(model: nn.Module, bits: int) -> list[nn.BatchNorm2d]:
    """The BatchNorm modules that the forward pass at ``bits`` uses."""
    switchable = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    owned = {id(bn) for s in switchable for bn in s.bns.values()}
    plain = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in owned]
    return [s.bn_for(bits) for s in switchable] + plain
