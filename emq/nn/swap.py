"""Turn a plain PyTorch model into a multi-bit one by swapping its modules in place.

``swap_modules(model, q, bits)`` walks the module tree once and replaces, by type:

- ``nn.Conv2d`` -> :class:`~emq.nn.layers.QConv2d`, ``nn.Linear`` -> :class:`~emq.nn.layers.QLinear`
  (same shapes; the already initialised weights are kept), configured with the weight
  quantizer, correction and scaling of ``q``;
- ``nn.BatchNorm2d`` -> ``make_norm(q.norm, ...)`` (switchable: one BN per bit-width; shared: one);
- ``nn.LayerNorm`` -> ``make_layer_norm(q.norm, ...)`` (same two choices, see :mod:`emq.nn.layers`);
- ``nn.ReLU`` -> :class:`~emq.nn.layers.QAct` (``q_b`` below 32 bits, ``q.fp_act`` at 32), so the
  input of every quantized conv that follows a ReLU is a quantized activation.

Modules named in ``keep`` (dotted names, e.g. the stem ``conv1`` and classifier ``fc`` of a
torchvision ResNet) stay full precision, as METHOD.md §1 keeps the first and last layer.
This is how torchvision's own ResNet-18/50 become multi-bit without a copy of their code.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from emq.config import QuantConfig
from emq.nn.layers import QAct, QConv2d, QLinear, QuantWeightMixin, make_layer_norm, make_norm
from emq.quant.schemes import make_act_quantizer, make_weight_quantizer


def make_act(q: QuantConfig, bits: tuple[int, ...]) -> QAct:
    """An activation of the configured scheme (its learnable parameters are its own)."""
    return QAct(q.fp_act, make_act_quantizer(q, bits))


def _qconv(conv: nn.Conv2d) -> QConv2d:
    new = QConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    new.weight = conv.weight
    new.bias = conv.bias
    return new


def _qlinear(lin: nn.Linear) -> QLinear:
    new = QLinear(lin.in_features, lin.out_features, lin.bias is not None)
    new.weight = lin.weight
    new.bias = lin.bias
    return new


def _replacement(mod: nn.Module, q: QuantConfig, bits: tuple[int, ...]) -> nn.Module | None:
    """The multi-bit module that takes the place of ``mod``, or None to leave it (and descend)."""
    if isinstance(mod, QuantWeightMixin | QAct):
        return None
    if type(mod) is nn.Conv2d:
        new = _qconv(mod)
    elif type(mod) is nn.Linear or type(mod).__name__ == "NonDynamicallyQuantizableLinear":
        new = _qlinear(mod)
    elif type(mod) is nn.BatchNorm2d:
        return make_norm(q.norm, mod.num_features, bits)
    elif type(mod) is nn.LayerNorm:
        return make_layer_norm(q.norm, mod.normalized_shape, bits, mod.eps)
    elif type(mod) is nn.ReLU:
        return make_act(q, bits)
    else:
        return None
    new.configure(q.correction, q.detach_stats, q.scale_by_mean, make_weight_quantizer(q, bits))
    return new


def swap_modules(model: nn.Module, q: QuantConfig, bits: tuple[int, ...], keep: Iterable[str] = ()) -> nn.Module:
    """Replace conv, linear, norm and ReLU modules of ``model`` by their multi-bit versions, in place.

    ``keep`` names modules (dotted paths) that stay as they are. Returns ``model``.
    """
    keep = set(keep)
    missing = keep - {name for name, _ in model.named_modules()}
    if missing:
        raise ValueError(f"swap_modules: no module named {', '.join(sorted(missing))}")

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if path in keep:
                continue
            new = _replacement(child, q, bits)
            if new is None:
                visit(child, path + ".")
            else:
                setattr(parent, name, new)

    visit(model, "")
    return model
