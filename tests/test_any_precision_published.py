"""The Any-Precision baseline as published (SHI-Labs/Any-Precision-DNNs), option for option:
its network (``model.block = "any_precision"``), its recipe (Adam, step decay, E scaling, bits
1/2/4/8/32: the method ``any_precision_published``), and the best epoch kept beside the last.

The facts checked here are read from upstream's ``models/resnet_quan.py`` (``PreActResNet``,
``PreActBasicBlockQ``, ``Activate``), ``models/quan_ops.py`` (``weight_quantize_fn``,
``activation_quantize_fn``, ``SwitchBatchNorm2d``), ``train.py``, ``optimizer.py`` and
``train_cifar10.sh``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_METHODS as TINY
from conftest import needs_data
from torch import nn

from emq.config import ConfigError, RunConfig, from_dict, load_config
from emq.data.load import load_data
from emq.methods import method_config
from emq.nn.layers import QConv2d, QuantWeightMixin, SwitchableBatchNorm2d, active_norms, set_bits
from emq.nn.models import AnyPrecisionBlock, make_model
from emq.results import ResultsStore
from emq.training.loop import best_epoch, learning_rate, make_optimizer, train

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT / "data"
PUBLISHED_BITS = (1, 2, 4, 8, 32)  # train_cifar10.sh: --bit_width_list "1,2,4,8,32"


def published(**overrides) -> RunConfig:
    return method_config("any_precision_published", load_config(overrides=overrides))


def resnet20x5(num_classes=10, in_channels=3) -> nn.Module:
    """Upstream's ``resnet20q``: PreActResNet with num_units [3, 3, 3] and expand=5 (stage widths
    16*5, 32*5, 64*5 = 80, 160, 320), which is emq's depth 20 at width 5."""
    cfg = published(**{"model.depth": 20, "model.width": 5})
    torch.manual_seed(0)
    return make_model(cfg.model, cfg.quant, cfg.train.bits, num_classes, in_channels)


# ---- the network -----------------------------------------------------------------------------------
def upstream_parameter_shapes(expand=5, units=(3, 3, 3), bits=PUBLISHED_BITS, in_channels=3, num_classes=10):
    """Parameter names and shapes of upstream's ``resnet20q``, in registration order, written out
    from its definitions (``model.named_parameters()`` of ``PreActResNet``):

    - ``conv0``: ``nn.Conv2d(3, 16 ep, 3, bias=False)``, full precision;
    - each ``layers.i`` (``PreActBasicBlockQ``): ``bn0`` (a ``SwitchBatchNorm2d``: one
      ``nn.BatchNorm2d`` per bit-width in ``bn_dict``) on the input channels, ``conv0`` 3x3
      (stride), ``bn1``, ``conv1`` 3x3; where stride != 1 also ``skip_conv`` (``nn.Conv2d`` 1x1,
      full precision) and ``skip_bn`` (one plain ``nn.BatchNorm2d``);
    - ``bn`` (switchable) on 64 ep channels, ``fc``: ``nn.Linear(64 ep, classes)`` with bias.
    """
    def switch_bn(name, c):
        return [(f"{name}.bn_dict.{b}.{p}", (c,)) for b in bits for p in ("weight", "bias")]

    ep = expand
    shapes = [("conv0.weight", (16 * ep, in_channels, 3, 3))]
    strides = [1] * units[0] + [2] + [1] * (units[1] - 1) + [2] + [1] * (units[2] - 1)
    channels = [16 * ep] * units[0] + [32 * ep] * units[1] + [64 * ep] * units[2]
    cin = 16 * ep
    for i, (stride, cout) in enumerate(zip(strides, channels)):
        shapes += switch_bn(f"layers.{i}.bn0", cin)
        shapes += [(f"layers.{i}.conv0.weight", (cout, cin, 3, 3))]
        shapes += switch_bn(f"layers.{i}.bn1", cout)
        shapes += [(f"layers.{i}.conv1.weight", (cout, cout, 3, 3))]
        if stride != 1:
            shapes += [(f"layers.{i}.skip_conv.weight", (cout, cin, 1, 1)),
                       (f"layers.{i}.skip_bn.weight", (cout,)), (f"layers.{i}.skip_bn.bias", (cout,))]
        cin = cout
    shapes += switch_bn("bn", 64 * ep)
    return shapes + [("fc.weight", (num_classes, 64 * ep)), ("fc.bias", (num_classes,))]


def emq_name(upstream: str) -> str:
    """Upstream's parameter name as emq calls it (AnyPrecisionBlock's docstring gives the map)."""
    name = upstream.replace("bn_dict", "bns")
    if name.startswith("conv0."):
        return name.replace("conv0.", "stem.", 1)
    if name.startswith("bn."):
        return name.replace("bn.", "head_bn.", 1)
    if name.startswith("layers."):
        _, i, module, rest = name.split(".", 3)
        module = {"bn0": "bn1", "conv0": "conv1", "bn1": "bn2", "conv1": "conv2",
                  "skip_conv": "shortcut.0", "skip_bn": "shortcut.1"}[module]
        return f"blocks.{i}.{module}.{rest}"
    return name


def test_resnet20x5_has_upstreams_parameters_name_for_name_shape_for_shape_in_order():
    ours = [(k, tuple(p.shape)) for k, p in resnet20x5().named_parameters()]
    assert ours == [(emq_name(k), shape) for k, shape in upstream_parameter_shapes()]


def test_resnet20x5_at_bits_1_2_4_8_32_has_960_shortcut_bn_parameters_in_blocks_3_and_6():
    model = resnet20x5()
    with_shortcut = [i for i, blk in enumerate(model.blocks) if blk.shortcut is not None]
    assert with_shortcut == [3, 6]  # the first block of stages 2 and 3 (upstream's strides list)
    per_block = [sum(p.numel() for p in model.blocks[i].shortcut[1].parameters()) for i in with_shortcut]
    # one plain BN (weight and bias) on 32*5 = 160 and on 64*5 = 320 channels, not one per bit-width
    assert per_block == [2 * 160, 2 * 320] and sum(per_block) == 960


def test_resnet20x5_has_6786330_parameters_as_counted_from_upstreams_definitions():
    # By hand, with 5 BN copies per switchable BN (one per bit-width) and a BN of c channels = 2c:
    #   stem conv 3*80*9                                                     =     2,160
    #   blocks 0-2 (80->80):   3 * (800 + 57,600 + 800 + 57,600)             =   350,400
    #   block 3 (80->160, /2): 800 + 115,200 + 1,600 + 230,400
    #                          + skip conv 80*160 + skip BN 2*160            =   361,120
    #   blocks 4-5 (160):      2 * (1,600 + 230,400 + 1,600 + 230,400)       =   928,000
    #   block 6 (160->320, /2): 1,600 + 460,800 + 3,200 + 921,600
    #                          + skip conv 160*320 + skip BN 2*320           = 1,439,040
    #   blocks 7-8 (320):      2 * (3,200 + 921,600 + 3,200 + 921,600)       = 3,699,200
    #   last BN 5*2*320 + fc 320*10 + 10                                     =     6,410
    #                                                                  total = 6,786,330
    # (upstream's train.py logs this figure as "number of parameters" for resnet20q on CIFAR-10).
    expected = sum(math.prod(shape) for _, shape in upstream_parameter_shapes())
    assert expected == 6_786_330
    assert sum(p.numel() for p in resnet20x5().parameters()) == expected


def test_first_conv_shortcut_convs_and_classifier_are_full_precision_and_nothing_follows_the_last_bn():
    model = resnet20x5()
    assert type(model.stem) is nn.Conv2d and type(model.fc) is nn.Linear and model.fc.bias is not None
    for i in (3, 6):
        conv, bn = model.blocks[i].shortcut
        assert type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
        assert type(bn) is nn.BatchNorm2d  # one BN, the same at every bit-width
        assert all(bn in active_norms(model, b) for b in PUBLISHED_BITS)
    assert isinstance(model.head_bn, SwitchableBatchNorm2d) and model.head_bn.trained_bits == list(PUBLISHED_BITS)
    assert isinstance(model.head_act, nn.Identity) and isinstance(model.stem_bn, nn.Identity)
    quantized = [m for m in model.modules() if isinstance(m, QuantWeightMixin)]
    assert len(quantized) == 18 and all(type(m) is QConv2d and m.scale_by_mean for m in quantized)


def test_every_layer_keeps_pytorchs_default_initialisation_drawn_in_upstreams_order():
    model = resnet20x5()  # drawn from seed 0
    weights = [w for w in model.parameters() if w.dim() == 4] + [model.fc.weight]
    assert len(weights) == 1 + 9 * 2 + 2 + 1  # stem, two 3x3 convs per block, two 1x1 shortcuts, fc
    torch.manual_seed(0)
    default = [nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], bias=False).weight for w in weights[:-1]]
    default.append(nn.Linear(weights[-1].shape[1], weights[-1].shape[0]).weight)
    assert all(torch.equal(a, b) for a, b in zip(weights, default))
    # emq's own block draws the same and then re-initialises Kaiming-normal (fan_out)
    emq = load_config(overrides={"model.preact": True, "model.depth": 20, "model.width": 5})
    torch.manual_seed(0)
    other = make_model(emq.model, emq.quant, PUBLISHED_BITS, 10, 3)
    assert not torch.equal(other.stem.weight, default[0])


# ---- the forward pass, derived by hand -------------------------------------------------------------
def weight_q(w: torch.Tensor, bits: int) -> torch.Tensor:
    """quan_ops.weight_quantize_fn, step by step: E = mean|W|; t = tanh(W) / max|tanh(W)|; at 32 bits
    E t; else with n = 2^b - 1 levels, E (2 round(n (t/2 + 1/2)) / n - 1)."""
    e = w.abs().mean()
    t = torch.tanh(w) / torch.tanh(w).abs().max()
    if bits == 32:
        return e * t
    n = 2 ** bits - 1
    return e * (2 * torch.round(n * (t / 2 + 0.5)) / n - 1)


def act_q(x: torch.Tensor, bits: int) -> torch.Tensor:
    """resnet_quan.Activate: ReLU at 32 bits; else round(n clamp(x, 0, 1)) / n."""
    if bits == 32:
        return torch.relu(x)
    n = 2 ** bits - 1
    return torch.round(n * torch.clamp(x, 0.0, 1.0)) / n


def bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """(x - running mean) / sqrt(running var + eps) * gamma + beta, per channel."""
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def fill_(module: nn.Module, seed: int) -> nn.Module:
    """Fixed, non-trivial weights and BN statistics (every bit-width's BN its own); eval mode."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, scale, shift=0.0):
        t.copy_(shift + scale * torch.randn(t.shape, generator=g))

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                rand(m.weight, 0.2, 1.0), rand(m.bias, 0.3), rand(m.running_mean, 0.3)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                rand(m.weight, 0.6)
                if m.bias is not None:
                    rand(m.bias, 0.3)
    return module.eval()


def expected_block(x: torch.Tensor, blk: AnyPrecisionBlock, bits: int, stride: int) -> torch.Tensor:
    """PreActBasicBlockQ.forward: out = act0(bn0(x)); shortcut = skip_bn(skip_conv(out)) where the
    block downsamples, else x; conv1(act1(bn1(conv0(out)))) + shortcut."""
    a = act_q(bn_eval(x, blk.bn1.bns[str(bits)]), bits)
    if blk.shortcut is None:
        shortcut = x
    else:
        shortcut = bn_eval(F.conv2d(a, blk.shortcut[0].weight, stride=stride), blk.shortcut[1])  # fp weight
    h = F.conv2d(a, weight_q(blk.conv1.weight, bits), stride=stride, padding=1)
    h = act_q(bn_eval(h, blk.bn2.bns[str(bits)]), bits)
    return F.conv2d(h, weight_q(blk.conv2.weight, bits), padding=1) + shortcut


@pytest.mark.parametrize("bits", PUBLISHED_BITS)
def test_two_blocks_identity_then_downsampling_compute_the_published_forward_pass(bits):
    q = published().quant
    first = fill_(AnyPrecisionBlock(2, 2, 1, q, PUBLISHED_BITS), seed=1)
    second = fill_(AnyPrecisionBlock(2, 3, 2, q, PUBLISHED_BITS), seed=2)
    for blk in (first, second):
        for m in blk.modules():
            if isinstance(m, QuantWeightMixin):
                m.configure("none", True, scale_by_mean=True)
    x = 1.5 * torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    net = set_bits(nn.Sequential(first, second), bits)
    with torch.no_grad():
        got = net(x)
        expected = expected_block(expected_block(x, first, bits, 1), second, bits, 2)
    assert got.shape == (2, 3, 3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # float32 rounding only


@pytest.mark.parametrize("bits", PUBLISHED_BITS)
def test_the_whole_network_is_stem_blocks_last_bn_mean_and_fc_with_no_activation_after_the_bn(bits):
    cfg = published(**{"model.depth": 8, "model.width": 0.125})  # stages of 2, 4, 8 channels
    model = set_bits(fill_(make_model(cfg.model, cfg.quant, cfg.train.bits, 5, 3), seed=4), bits)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = F.conv2d(x, model.stem.weight, padding=1)  # full-precision first conv, no BN or act after it
        for blk, stride in zip(model.blocks, (1, 2, 2)):
            h = expected_block(h, blk, bits, stride)
        h = bn_eval(h, model.head_bn.bns[str(bits)]).mean(dim=2).mean(dim=2)
        expected = F.linear(h, model.fc.weight, model.fc.bias)  # full-precision classifier
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_one_bit_weights_are_plus_or_minus_e_and_one_bit_activations_zero_or_one():
    model = set_bits(resnet20x5(), 1)
    conv = model.blocks[0].conv1
    levels = torch.unique(conv.effective_weight())
    e = conv.weight.abs().mean()
    torch.testing.assert_close(levels, torch.stack([-e, e]).detach())
    a = model.blocks[0].act1(torch.linspace(-1, 2, 31))
    assert set(a.tolist()) == {0.0, 1.0}


# ---- the recipe ------------------------------------------------------------------------------------
def test_the_method_sets_upstreams_recipe_option_for_option():
    cfg = published()
    assert (cfg.model.block, cfg.model.preact) == ("any_precision", True)
    assert cfg.quant.scale_by_mean and cfg.quant.fp_act == "relu" and not cfg.quant.quantize_first_last
    assert cfg.quant.norm == "switchable" and cfg.quant.correction == "none"
    t = cfg.train
    assert (t.optimizer, t.lr, t.weight_decay) == ("adam", 1e-3, 0.0)  # --optimizer adam --lr 0.001 --weight-decay 0
    assert (t.schedule, t.milestones, t.gamma) == ("step", (0.5, 0.75, 0.9), 0.1)  # --lr_decay 100,150,180 of 200
    assert t.bits == PUBLISHED_BITS and t.distill == "recursive"


def multistep_lrs(lr: float, milestones: list[int], epochs: int) -> list[float]:
    """The learning rate of each epoch under PyTorch's MultiStepLR stepped once per epoch, as train.py does."""
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("epochs, milestones", [(200, [100, 150, 180]), (20, [10, 15, 18]), (4, [2, 3, 4])])
def test_the_step_schedule_is_multisteplr_at_the_milestones_scaled_to_the_epochs(epochs, milestones):
    cfg = published(**{"train.epochs": epochs})
    spe = 3
    ours = [learning_rate(cfg, e * spe + s, epochs * spe, spe) for e in range(epochs) for s in range(spe)]
    expected = [lr for lr in multistep_lrs(1e-3, milestones, epochs) for _ in range(spe)]
    assert ours == pytest.approx(expected, rel=1e-12)


def test_cosine_sgd_stays_the_default():
    t = RunConfig().train
    assert (t.optimizer, t.schedule, t.lr) == ("sgd", "cosine", 0.1)
    opt = make_optimizer(nn.Linear(2, 2), t)
    assert type(opt) is torch.optim.SGD and opt.defaults["nesterov"] and opt.defaults["weight_decay"] == 5e-4
    adam = make_optimizer(nn.Linear(2, 2), published().train)
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.9, 0.999)
    assert adam.defaults["weight_decay"] == 0.0


@pytest.mark.parametrize("overrides, what", [
    ({"model.block": "any_precision"}, "set model.preact=true"),
    ({"model.block": "upstream"}, "use one of emq, any_precision"),
    ({"train.optimizer": "rmsprop"}, "use one of sgd, adam"),
    ({"train.schedule": "linear"}, "use one of cosine, step"),
    ({"train.milestones": [0.5, 1.5]}, "fractions of train.epochs in \\(0, 1\\)"),
    ({"train.gamma": 0.0}, "'train.gamma' must be positive"),
])
def test_a_block_without_its_layout_and_unknown_choices_are_config_errors(overrides, what):
    with pytest.raises(ConfigError, match=what):
        load_config(overrides=overrides)


def test_the_new_fields_at_their_defaults_leave_every_committed_runs_hash_unchanged():
    """The new fields default to today's behaviour: they stay out of every stored config's hash, which
    is the same whether config.json names them (at their defaults) or predates them. (That each hash
    is its run's folder name: test_config.py.)"""
    paths = sorted((ROOT / "results" / "runs").glob("*/config.json"))
    assert paths, "no committed runs"
    new = {"model": ("block",), "train": ("optimizer", "schedule", "milestones", "gamma")}
    older_runs = 0
    for path in paths:
        stored = json.loads(path.read_text())
        cfg = from_dict(stored)
        if any(k in cfg.non_default().get(section, {}) for section, keys in new.items() for k in keys):
            continue  # a run that uses the new options (any_precision_published): they are in its hash
        older_runs += 1
        older = {section: {k: v for k, v in fields.items() if k not in new.get(section, ())}
                 for section, fields in stored.items()}
        assert from_dict(older).hash() == cfg.hash(), path
    assert older_runs >= 72  # the runs committed before these options existed


# ---- training, resumption and the best epoch ---------------------------------------------------------
def test_the_best_epoch_is_chosen_by_the_top_bit_width_first_of_ties_and_keeps_every_bit_width():
    rows = [{"epoch": 1, "test_acc": {"2": 0.5, "32": 0.7}}, {"epoch": 2, "test_acc": {"2": 0.4, "32": 0.8}},
            {"epoch": 3, "test_acc": {"2": 0.6, "32": 0.8}}, {"epoch": 4, "test_acc": {"2": 0.9, "32": 0.75}}]
    assert best_epoch(rows) == {"best_epoch": 2, "acc_at_best_epoch": {"2": 0.4, "32": 0.8}}




@needs_data
def test_an_adam_step_schedule_run_resumes_bitwise_and_keeps_the_best_epoch_beside_the_last(tmp_path):
    cfg = method_config("any_precision_published", load_config(profile="smoke", overrides=TINY))
    data = load_data(cfg.data)
    whole = train(cfg, ResultsStore(tmp_path / "whole"), device="cpu", progress=False, data=data)
    store = ResultsStore(tmp_path / "resumed")
    stopped = train(cfg, store, device="cpu", progress=False, data=data, stop_after=3)
    ckpt = torch.load(stopped.path / "checkpoint.pt", weights_only=True)
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(ckpt["optimizer"]["state"].values())))  # Adam's moments
    resumed = train(cfg, store, device="cpu", progress=False, data=data)
    a = torch.load(whole.path / "model.pt", weights_only=True)
    b = torch.load(resumed.path / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = whole.metrics()
    assert [row["lr"] for row in metrics] == pytest.approx([1e-3, 1e-4])  # epoch 2 of 2 is past the 0.5 milestone
    summary = whole.summary
    assert summary["acc"] == metrics[-1]["test_acc"]  # the last epoch stays the reported one
    best = max(metrics, key=lambda r: r["test_acc"]["32"])
    assert summary["acc_at_best_epoch"] == best["test_acc"] and summary["best_epoch"] == best["epoch"]
    assert resumed.summary["acc_at_best_epoch"] == summary["acc_at_best_epoch"]
