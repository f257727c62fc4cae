"""Multi-bit layers and models: bit switching, switchable vs shared BN, full-precision ends."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from emq.config import ModelConfig, QuantConfig
from emq.nn.layers import (
    MultiBit,
    QAct,
    QConv2d,
    QLinear,
    QuantWeightMixin,
    SwitchableBatchNorm2d,
    active_norms,
    make_norm,
    set_bits,
)
from emq.nn.models import make_model
from emq.quant.quantizers import quantize_weight

BITS = (2, 4, 8, 32)


def model(depth=8, width=0.25, preact=False, bits=BITS, seed=0, **quant) -> nn.Module:
    torch.manual_seed(seed)
    return make_model(ModelConfig(depth=depth, width=width, preact=preact), QuantConfig(**quant), bits,
                      num_classes=10, in_channels=1)


def images(n=8, seed=0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# ---- set_bits -------------------------------------------------------------------------------------
def test_set_bits_switches_every_multi_bit_module():
    m = model()
    multibit = [mod for mod in m.modules() if isinstance(mod, MultiBit)]
    kinds = {type(mod) for mod in multibit}
    assert {QConv2d, QAct, SwitchableBatchNorm2d} <= kinds
    for b in (2, 3, 8, 32):
        assert set_bits(m, b) is m
        assert all(mod.bits == b for mod in multibit)


def test_set_bits_rejects_an_unsupported_bit_width_and_changes_nothing():
    m = set_bits(model(), 4)
    with pytest.raises(ValueError, match="unsupported bit-width 33"):
        set_bits(m, 33)
    assert all(mod.bits == 4 for mod in m.modules() if isinstance(mod, MultiBit))


def test_outputs_depend_on_the_bit_width():
    m = model().eval()
    x = images()
    out = {b: set_bits(m, b)(x) for b in (2, 4, 32)}
    assert not torch.allclose(out[2], out[32])
    assert not torch.allclose(out[4], out[32])
    assert torch.equal(set_bits(m, 2)(x), out[2])  # switching back gives the same network


# ---- BatchNorm: switchable and shared ----------------------------------------------------------
def test_switchable_bn_keeps_one_bn_per_trained_bit_width():
    m = model()
    switchable = [mod for mod in m.modules() if isinstance(mod, SwitchableBatchNorm2d)]
    assert switchable
    for s in switchable:
        assert sorted(s.bns, key=int) == ["2", "4", "8", "32"]
        assert len({id(bn) for bn in s.bns.values()}) == 4
        for b in BITS:
            assert s.bn_for(b) is s.bns[str(b)]


@pytest.mark.parametrize("bits, nearest", [(1, 2), (3, 4), (5, 4), (6, 8), (7, 8), (12, 8), (16, 8)])
def test_untrained_bit_width_uses_the_bn_of_the_nearest_trained_one_ties_to_the_higher(bits, nearest):
    s = SwitchableBatchNorm2d(4, BITS)
    assert s.bn_for(bits) is s.bns[str(nearest)]


def test_switchable_bn_forward_uses_only_the_bn_of_the_current_bit_width():
    s = SwitchableBatchNorm2d(4, BITS).train()
    s.set_bits(3)  # untrained: the 4-bit BN (tie between 2 and 4 goes to 4)
    s(torch.randn(16, 4, 5, 5))
    assert {b: int(bn.num_batches_tracked) for b, bn in s.bns.items()} == {"2": 0, "4": 1, "8": 0, "32": 0}


def test_switchable_bn_keeps_sorted_unique_trained_bits():
    assert SwitchableBatchNorm2d(4, (8, 2, 8, 32)).trained_bits == [2, 8, 32]


def test_shared_bn_model_has_a_single_bn_per_layer():
    shared, switchable = model(norm="shared"), model(norm="switchable")
    assert not any(isinstance(mod, SwitchableBatchNorm2d) for mod in shared.modules())
    n_shared = sum(isinstance(mod, nn.BatchNorm2d) for mod in shared.modules())
    n_layers = sum(isinstance(mod, SwitchableBatchNorm2d) for mod in switchable.modules())
    assert n_shared == n_layers > 0
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in switchable.modules()) == n_layers * len(BITS)
    # every bit-width runs through the same BN objects
    ids = {b: [id(bn) for bn in active_norms(shared, b)] for b in (2, 3, 32)}
    assert ids[2] == ids[3] == ids[32] and len(ids[2]) == n_shared


def test_active_norms_of_a_switchable_model_are_the_bns_of_that_bit_width():
    m = model()
    active = {id(bn) for bn in active_norms(m, 5)}  # 5 -> nearest trained: 4
    expected = {id(s.bns["4"]) for s in m.modules() if isinstance(s, SwitchableBatchNorm2d)}
    assert active == expected


def test_make_norm_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        make_norm("group", 4, BITS)


# ---- quantized conv / linear / activation ------------------------------------------------------
@pytest.mark.parametrize("mode", ["mean", "meanvar"])
def test_qconv_at_32_bits_gives_the_same_output_with_and_without_correction(mode):
    torch.manual_seed(0)
    conv = QConv2d(3, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    conv.configure("none", True, False)
    plain = {b: set_bits(conv, b)(x) for b in (2, 32)}
    conv.configure(mode, True, False)
    corrected = {b: set_bits(conv, b)(x) for b in (2, 32)}
    assert torch.equal(corrected[32], plain[32])
    assert not torch.allclose(corrected[2], plain[2])  # the correction does act below 32 bits


def test_effective_weight_is_q_b_below_32_and_q_32_at_32():
    torch.manual_seed(0)
    lin = QLinear(12, 5)
    assert torch.equal(lin.effective_weight(32), quantize_weight(lin.weight, 32))
    assert torch.equal(lin.effective_weight(3), quantize_weight(lin.weight, 3))
    lin.set_bits(3)
    x = torch.randn(4, 12)
    assert torch.allclose(lin(x), x @ quantize_weight(lin.weight, 3).T + lin.bias)


def test_corrected_layer_weights_have_the_full_precision_channel_statistics():
    torch.manual_seed(0)
    conv = QConv2d(8, 16, 3, bias=False)
    conv.configure("meanvar", True, False)
    ref = conv.effective_weight(32).detach().flatten(1)
    for b in (2, 3, 4):
        w = conv.effective_weight(b).detach().flatten(1)
        assert torch.allclose(w.mean(1), ref.mean(1), atol=1e-5)
        assert torch.allclose(w.std(1, unbiased=False), ref.std(1, unbiased=False), atol=1e-5)


def test_qact_is_relu_or_clamp_at_32_bits_and_quantized_below():
    x = torch.tensor([-1.0, 0.2, 0.5, 0.9, 3.0])
    assert torch.equal(set_bits(QAct("relu"), 32)(x), torch.tensor([0.0, 0.2, 0.5, 0.9, 3.0]))
    assert torch.equal(set_bits(QAct("clamp"), 32)(x), torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]))
    for fp_act in ("relu", "clamp"):
        q = set_bits(QAct(fp_act), 2)(x)
        assert torch.allclose(q, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0, 1.0]))  # round(3*0.5)=2 (half to even)
    with pytest.raises(ValueError, match="unknown full-precision activation"):
        QAct("gelu")


# ---- models ------------------------------------------------------------------------------------
def test_first_conv_and_last_linear_stay_full_precision_by_default():
    m = model().eval()
    assert type(m.stem) is nn.Conv2d and type(m.fc) is nn.Linear
    x = images()
    stem = {b: set_bits(m, b).stem(x) for b in (2, 32)}
    assert torch.equal(stem[2], stem[32])
    feats = set_bits(m, 2).features(x)
    assert torch.equal(m.fc(feats), feats @ m.fc.weight.T + m.fc.bias)


def test_quantize_first_last_quantizes_the_first_conv_and_last_linear():
    m = model(quantize_first_last=True).eval()
    assert isinstance(m.stem, QConv2d) and isinstance(m.fc, QLinear)
    x = images()
    assert not torch.allclose(set_bits(m, 2).stem(x), set_bits(m, 32).stem(x))


def test_model_configures_every_quantized_layer_from_the_quant_config():
    m = model(correction="meanvar", detach_stats=False, scale_by_mean=True, quantize_first_last=True)
    layers = [mod for mod in m.modules() if isinstance(mod, QuantWeightMixin)]
    assert layers
    assert all((q.correction, q.detach_stats, q.scale_by_mean) == ("meanvar", False, True) for q in layers)


def expected_params(depth: int, width: float, bn_copies: int, in_channels=1, num_classes=10) -> int:
    """Parameters of the CIFAR ResNet (option-B shortcuts), counted by hand; one BN = 2c."""
    n = (depth - 2) // 6
    c = [max(1, round(k * width)) for k in (16, 32, 64)]
    bn = lambda ch: 2 * ch * bn_copies  # noqa: E731
    total = 9 * in_channels * c[0] + bn(c[0])  # stem conv + BN
    cin = c[0]
    for stage, cout in enumerate(c):
        for i in range(n):
            total += 9 * cin * cout + 9 * cout * cout + bn(cout) + bn(cout)
            if (stage > 0 and i == 0) or cin != cout:
                total += cin * cout + bn(cout)  # 1x1 shortcut conv + BN
            cin = cout
    return total + c[2] * num_classes + num_classes


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("norm, copies", [("shared", 1), ("switchable", len(BITS))])
@pytest.mark.parametrize("width", [0.25, 0.5])
def test_resnet_param_counts_of_depth_8_and_20_are_as_counted_by_hand(norm, copies, width):
    m8, m20 = model(depth=8, width=width, norm=norm), model(depth=20, width=width, norm=norm)
    assert n_params(m8) == expected_params(8, width, copies)
    assert n_params(m20) == expected_params(20, width, copies)
    # depth 20 adds two identity blocks per stage: two 3x3 convs and two BNs each
    c = [round(k * width) for k in (16, 32, 64)]
    assert n_params(m20) - n_params(m8) == sum(2 * (18 * ch * ch + 2 * 2 * ch * copies) for ch in c)


@pytest.mark.parametrize("bits", [2, 3, 32])
def test_preact_resnet_forward_works_at_any_bit_width(bits):
    m = model(preact=True)
    assert isinstance(m.stem_bn, nn.Identity) and isinstance(m.head_bn, SwitchableBatchNorm2d)
    assert all(len(blk.shortcut) == 1 for blk in m.blocks if isinstance(blk.shortcut, nn.Sequential))
    out = set_bits(m, bits)(images(4))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad and p.dim() == 4)


@pytest.mark.parametrize("depth", [7, 9, 10, 21])
def test_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match=rf"6n\+2.*got {depth}"):
        model(depth=depth)


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        make_model(ModelConfig(arch="vgg"), QuantConfig(), BITS, 10, 1)
