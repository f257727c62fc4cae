"""ResNet-18/50 (torchvision's definitions, swapped) and the small ViT: multi-bit, both norms.

Each arch builds, runs a forward pass at every trained and an untrained bit-width, and
takes one multi-bit training step on a tiny input that changes its weights.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from emq.config import ModelConfig, QuantConfig, RunConfig
from emq.nn.layers import QAct, QConv2d, QLinear, SwitchableBatchNorm2d, SwitchableLayerNorm, set_bits
from emq.nn.models import make_model
from emq.nn.swap import swap_modules
from emq.training.loop import shared_batch, train_step

BITS = (2, 4, 32)
# arch -> (input side, channels): small inputs, as the CPU tests can afford
SHAPES = {"resnet18": (32, 3), "resnet50": (32, 1), "vit_tiny": (16, 1)}


def build(arch: str, norm: str = "switchable", **quant) -> nn.Module:
    torch.manual_seed(0)
    size, channels = SHAPES[arch]
    return make_model(ModelConfig(arch=arch), QuantConfig(norm=norm, **quant), BITS, num_classes=5,
                      in_channels=channels, image_size=size)


def tiny_batch(arch: str, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    size, channels = SHAPES[arch]
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_new_arch_names_keep_the_default_config_hash():
    assert RunConfig().model.arch == "resnet"
    assert RunConfig().hash() == RunConfig(model=ModelConfig(arch="resnet")).hash()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnets_are_swapped_not_copied(arch):
    model = build(arch)
    assert isinstance(model, torchvision.models.ResNet)  # torchvision's own class and forward
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear  # first and last stay full precision
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, QConv2d) for m in convs if m is not model.conv1)
    assert not any(type(m) is nn.ReLU for m in model.modules())
    assert any(isinstance(m, QAct) for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(any(bn is b for s in model.modules() if isinstance(s, SwitchableBatchNorm2d) for b in s.bns.values())
               for bn in bns)  # every BN belongs to a switchable one


def test_swap_keeps_shapes_and_weights_and_first_last():
    plain = torchvision.models.resnet18(weights=None, num_classes=5)
    before = {k: v.clone() for k, v in plain.state_dict().items() if "bn" not in k and "downsample.1" not in k}
    swapped = swap_modules(plain, QuantConfig(norm="shared"), BITS, keep=("conv1", "fc"))
    after = swapped.state_dict()
    for k, v in before.items():  # conv and linear weights are the ones torchvision initialised
        assert torch.equal(after[k], v), k
    with pytest.raises(ValueError, match="no module named"):
        swap_modules(torchvision.models.resnet18(weights=None), QuantConfig(), BITS, keep=("stem",))


def test_quantize_first_last_swaps_the_ends_too():
    model = build("resnet18", quantize_first_last=True)
    assert isinstance(model.conv1, QConv2d) and isinstance(model.fc, QLinear)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vit_tiny"])
@pytest.mark.parametrize("norm", ["switchable", "shared"])
def test_forward_at_every_bit_width_and_one_training_step(arch, norm):
    model = build(arch, norm).train()
    x, y = tiny_batch(arch)
    outs = {}
    with torch.no_grad():
        for b in (*BITS, 3):  # 3 was not trained: switchable norms fall back to the nearest
            outs[b] = set_bits(model, b)(x)
            assert outs[b].shape == (4, 5) and torch.isfinite(outs[b]).all()
    assert not torch.allclose(outs[2], outs[32])  # the bit-width changes the function
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = train_step(model, shared_batch(x, y, BITS))[0]
    opt.step()
    assert set(losses) == set(BITS) and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_vit_quantizes_every_block_linear_and_switches_layer_norm():
    model = build("vit_tiny")
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks")]
    assert len(linears) == 12 * 4 and all(isinstance(m, QLinear) for m in linears)  # qkv, proj, fc1, fc2
    assert type(model.head) is nn.Linear and type(model.patch_embed) is nn.Conv2d
    norms = [m for m in model.modules() if isinstance(m, SwitchableLayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(list(n.norms) == ["2", "4", "32"] for n in norms)
    assert not any(isinstance(m, SwitchableLayerNorm) for m in build("vit_tiny", "shared").modules())


def test_switchable_layer_norm_uses_one_gain_per_bit_width():
    ln = SwitchableLayerNorm(8, (2, 32))
    with torch.no_grad():
        ln.norms["2"].weight.fill_(2.0)
    x = torch.randn(3, 8)
    assert torch.allclose(set_bits(ln, 2)(x), 2 * set_bits(ln, 32)(x), atol=1e-6)
    assert ln.norm_for(4) is ln.norms["2"] and ln.norm_for(24) is ln.norms["32"]
