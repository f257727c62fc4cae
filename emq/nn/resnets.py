"""ImageNet ResNet-18 and ResNet-50: torchvision's own definitions, made multi-bit.

``torchvision.models.resnet18/50`` build the network (7x7 stem, max-pool, four stages,
torchvision's initialisation); :func:`emq.nn.swap.swap_modules` then puts quantized conv and
linear layers, switchable or shared BN and quantized activations in place of torchvision's
modules. The stem conv and the classifier stay full precision unless
``quant.quantize_first_last``. ``model.depth``, ``width`` and ``preact`` describe the CIFAR
ResNet and do not apply here.
"""
from __future__ import annotations

from torch import nn

from emq.config import ModelConfig, QuantConfig
from emq.nn.swap import swap_modules


def make_torchvision_resnet(name: str, q: QuantConfig, bits: tuple[int, ...], num_classes: int,
                            in_channels: int) -> nn.Module:
    """torchvision's ResNet ``name`` (resnet18 | resnet50) with multi-bit modules swapped in."""
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:  # e.g. grey images: the same stem with another number of input channels
        old = model.conv1
        model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    keep = () if q.quantize_first_last else ("conv1", "fc")
    return swap_modules(model, q, bits, keep=keep)


def resnet18(m: ModelConfig, q: QuantConfig, bits, num_classes: int, in_channels: int, image_size: int = 224):
    return make_torchvision_resnet("resnet18", q, bits, num_classes, in_channels)


def resnet50(m: ModelConfig, q: QuantConfig, bits, num_classes: int, in_channels: int, image_size: int = 224):
    return make_torchvision_resnet("resnet50", q, bits, num_classes, in_channels)
