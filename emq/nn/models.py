"""Multi-bit models, by name (:data:`ARCHS`). CIFAR ResNet-20 (He et al. 2016, option-B shortcuts) with a width
multiplier, a depth parameter, an optional pre-activation layout and any number of input
channels; the small variants of the cpu profile are the same code at a smaller width.
``model.block = "any_precision"`` builds Any-Precision's pre-activation ResNet as published
(:class:`AnyPrecisionBlock`).
torchvision's ResNet-18/50 (:mod:`emq.nn.resnets`) and a DeiT-tiny-like ViT (:mod:`emq.nn.vit`)
are registered beside it.
"""
from __future__ import annotations

import torch
from torch import nn

from emq.config import ModelConfig, QuantConfig, RunConfig, register
from emq.data.load import load_data
from emq.nn.layers import QConv2d, QLinear, QuantWeightMixin, make_norm
from emq.nn.resnets import resnet18, resnet50
from emq.nn.swap import make_act
from emq.nn.vit import vit_tiny
from emq.quant.schemes import make_weight_quantizer
from emq.results import load_state, load_torch


class Block(nn.Module):
    """Basic residual block: two 3x3 quantized convs, BN after each (or before, if preact)."""

    def __init__(self, cin: int, cout: int, stride: int, q: QuantConfig, bits: tuple[int, ...], preact: bool):
        super().__init__()
        self.preact = preact
        self.conv1 = QConv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = QConv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn1 = make_norm(q.norm, cin if preact else cout, bits)
        self.bn2 = make_norm(q.norm, cout, bits)
        self.act1, self.act2 = make_act(q, bits), make_act(q, bits)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                QConv2d(cin, cout, 1, stride, bias=False),
                *([] if preact else [make_norm(q.norm, cout, bits)]),
            )

    def forward(self, x):
        if self.preact:
            out = self.conv1(self.act1(self.bn1(x)))
            return self.conv2(self.act2(self.bn2(out))) + self.shortcut(x)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class AnyPrecisionBlock(nn.Module):
    """Any-Precision's pre-activation block as published (SHI-Labs/Any-Precision-DNNs,
    ``models/resnet_quan.py``, ``PreActBasicBlockQ``): ``conv2(act2(bn2(conv1(a)))) + shortcut``
    with ``a = act1(bn1(x))``.

    Unlike :class:`Block` with ``preact``: the downsampling shortcut takes the pre-activated,
    quantized input ``a`` (not ``x``), through a full-precision 1x1 conv and one plain BatchNorm
    shared by all bit-widths. Upstream's names: bn0, act0, conv0, bn1, act1, conv1, skip_conv,
    skip_bn are ours bn1, act1, conv1, bn2, act2, conv2, shortcut.0, shortcut.1.
    """

    def __init__(self, cin: int, cout: int, stride: int, q: QuantConfig, bits: tuple[int, ...]):
        super().__init__()
        # built in upstream's order, so that one seed draws the same default-initialised weights
        self.bn1 = make_norm(q.norm, cin, bits)
        self.act1 = make_act(q, bits)
        self.conv1 = QConv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = make_norm(q.norm, cout, bits)
        self.act2 = make_act(q, bits)
        self.conv2 = QConv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        a = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


# model.block: the residual blocks ResNet builds (emq: Block; any_precision: AnyPrecisionBlock, upstream's layout)
BLOCKS = ("emq", "any_precision")
register("model.block", BLOCKS)


class ResNet(nn.Module):
    """CIFAR-style ResNet of depth 6n+2 with stage widths 16, 32, 64 times ``width``.

    With ``block = "any_precision"`` it is upstream's ``PreActResNet``: the blocks of
    :class:`AnyPrecisionBlock`, a last (switchable) BN with no activation after it, and PyTorch's
    default initialisation of every layer; its stem conv and classifier are full precision as
    upstream's when ``quantize_first_last`` is off (the default).
    """

    def __init__(self, m: ModelConfig, q: QuantConfig, bits: tuple[int, ...], num_classes: int, in_channels: int):
        super().__init__()
        if (m.depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 (8, 14, 20, 32, ...), got {m.depth}")
        n = (m.depth - 2) // 6
        published = m.block == "any_precision"
        if published and not m.preact:
            raise ValueError("model.block 'any_precision' is upstream's pre-activation network: it needs preact=True")
        widths = [max(1, round(c * m.width)) for c in (16, 32, 64)]
        first = QConv2d if q.quantize_first_last else nn.Conv2d
        last = QLinear if q.quantize_first_last else nn.Linear
        self.stem = first(in_channels, widths[0], 3, 1, 1, bias=False)
        # The stem's BN and activation are part of the first block's input in the
        # pre-activation layout, so they only exist in the post-activation one.
        self.stem_bn = nn.Identity() if m.preact else make_norm(q.norm, widths[0], bits)
        self.stem_act = nn.Identity() if m.preact else make_act(q, bits)
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(AnyPrecisionBlock(cin, cout, stride, q, bits) if published
                              else Block(cin, cout, stride, q, bits, m.preact))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head_bn = make_norm(q.norm, cin, bits) if m.preact else nn.Identity()
        self.head_act = make_act(q, bits) if m.preact and not published else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = last(cin, num_classes)
        for mod in self.modules():
            if isinstance(mod, QuantWeightMixin):
                mod.configure(q.correction, q.detach_stats, q.scale_by_mean,
                              make_weight_quantizer(q, bits))
            if isinstance(mod, nn.Conv2d) and not published:  # upstream keeps PyTorch's default
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x):
        """Penultimate features (after global pooling), the input of the classifier."""
        x = self.stem_act(self.stem_bn(self.stem(x)))
        x = self.head_act(self.head_bn(self.blocks(x)))
        return self.pool(x).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


def cifar_resnet(m: ModelConfig, q: QuantConfig, bits, num_classes: int, in_channels: int, image_size: int = 32):
    return ResNet(m, q, bits, num_classes, in_channels)


# arch name -> builder(m, q, bits, num_classes, in_channels, image_size)
ARCHS = {"resnet": cifar_resnet, "resnet18": resnet18, "resnet50": resnet50, "vit_tiny": vit_tiny}
register("model.arch", ARCHS)


def make_model(m: ModelConfig, q: QuantConfig, bits: tuple[int, ...], num_classes: int, in_channels: int,
               image_size: int = 32) -> nn.Module:
    """Build the multi-bit model named by ``m.arch`` for the trained bit-widths ``bits``."""
    if m.arch not in ARCHS:
        raise ValueError(f"unknown arch {m.arch!r}: use one of {', '.join(ARCHS)}")
    return ARCHS[m.arch](m, q, bits, num_classes, in_channels, image_size)


def build_model(cfg: RunConfig, data, device: torch.device | str = "cpu") -> nn.Module:
    """The model of ``cfg``, initialised from ``cfg.train.seed`` without touching global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = make_model(cfg.model, cfg.quant, cfg.train.bits, data.num_classes, data.in_channels, data.image_size)
    return model.to(device)


def load_trained(run, data=None, device: str = "cpu") -> nn.Module:
    """The final model of a finished run, loaded with ``weights_only=True``."""
    run.check_finished()
    data = data or load_data(run.config.data)
    model = build_model(run.config, data, device)
    fix = "the run is damaged: delete its folder and train it again"
    path = run.path / "model.pt"
    load_state(model, load_torch(path, device, fix), path, fix)
    return model.eval()
