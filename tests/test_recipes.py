"""The training recipes of the related methods (METHOD.md §5): schedules, the joint-distillation
loss, shift-bit gradient scaling and Double Rounding's per-precision scale gradient."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_METHODS as TINY

from emq.config import load_config
from emq.data.load import load_data
from emq.nn.layers import QAct, QConv2d
from emq.nn.models import make_model
from emq.quant.schemes import DoubleRoundingQuantizer
from emq.quant.shiftbit import shift_scaled, shift_slope, shift_soft
from emq.results import ResultsStore
from emq.training.distill import kd_loss
from emq.training.loop import make_companion, shared_batch, train, train_step
from emq.training.recipes import (
    act_bits,
    active_bits,
    quantized_blocks,
    quantized_share,
    stage,
    steepness,
    step_configure,
)

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"


def train_cfg(**overrides):
    return load_config(profile="smoke", overrides={**TINY, **overrides}).train


def test_progressive_bits_adds_bit_widths_high_to_low_in_equal_shares_of_the_steps():
    t = train_cfg(**{"train.progressive": "bits", "train.bits": [2, 4, 8, 32]})
    assert [active_bits(t, s, 8) for s in range(8)] == ([(32,)] * 2 + [(32, 8)] * 2 + [(32, 8, 4)] * 2
                                                         + [(32, 8, 4, 2)] * 2)
    assert active_bits(train_cfg(), 0, 8) == (32, 8, 4, 2)  # off: all bit-widths from the first step


def test_weights_first_keeps_activations_at_full_precision_for_the_first_half():
    t = train_cfg(**{"train.progressive": "weights_first"})
    assert [act_bits(t, s, 10) for s in range(10)] == [32] * 5 + [None] * 5
    model = make_model(load_config(profile="smoke").model, load_config(profile="smoke").quant, (2, 4, 8, 32), 10, 1)
    step_configure(t, model, 0, 10)(model, 2)
    assert {m.bits for m in model.modules() if isinstance(m, QAct)} == {32}
    assert {m.bits for m in model.modules() if isinstance(m, QConv2d)} == {2}
    assert stage(9, 10, 2) == 1 and stage(4, 10, 2) == 0


def test_stochastic_precision_quantizes_a_rising_seeded_share_of_the_blocks():
    t = train_cfg(**{"train.stochastic_precision": 0.5})
    assert quantized_share(t, 0, 11) == 0.5 and quantized_share(t, 10, 11) == 1.0
    assert quantized_share(t, 5, 11) == pytest.approx(0.75)
    assert quantized_share(train_cfg(), 0, 11) == 1.0  # off
    masks = [quantized_blocks(8, 0.5, seed=0, step=s) for s in range(20)]
    assert all(int(m.sum()) == 4 for m in masks)
    assert torch.equal(masks[3], quantized_blocks(8, 0.5, seed=0, step=3))  # a resumed run draws the same
    assert len({tuple(m.tolist()) for m in masks}) > 5  # and the draw changes from step to step
    cfg = load_config(profile="smoke", overrides={"model.depth": 14})  # 6 blocks
    model = make_model(cfg.model, cfg.quant, cfg.train.bits, 10, 1)
    step_configure(t, model, 0, 11)(model, 2)
    conv_bits = [block.conv1.bits for block in model.blocks]
    assert sorted(conv_bits) == [2, 2, 2, 32, 32, 32]


def test_shift_steepness_grows_geometrically_from_start_to_end():
    q = load_config().quant
    assert steepness(q, 0, 101) == pytest.approx(q.steepness_start)
    assert steepness(q, 100, 101) == pytest.approx(q.steepness_end)
    assert steepness(q, 50, 101) == pytest.approx(math.sqrt(q.steepness_start * q.steepness_end))


def test_kd_loss_is_t_squared_times_the_kl_of_the_softened_distributions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    p, q = F.softmax(t / 4, 1), F.softmax(s / 4, 1)
    direct = 16 * (p * (p.log() - q.log())).sum(1).mean()
    assert kd_loss(s, t, 4.0).item() == pytest.approx(direct.item(), rel=1e-5)
    assert kd_loss(s, s, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_joint_distillation_trains_the_companion_from_labels_and_the_students():
    cfg = load_config(profile="smoke", overrides={**TINY, "train.distill": "joint"})
    data = load_data(cfg.data)
    model, companion = make_model(cfg.model, cfg.quant, cfg.train.bits, 10, 1), make_companion(cfg, data, "cpu")
    x, y, _ = next(data.train.batches(32))
    losses, _ = train_step(model, shared_batch(x, y, cfg.train.bits), "joint", companion=companion, temperature=4.0)
    assert set(losses) == {*cfg.train.bits, "companion"}
    assert all(p.grad is not None for p in companion.parameters())
    assert losses[32] > F.cross_entropy(model(x), y).item()  # CE plus a positive KL term


def test_the_scaled_shift_staircase_has_the_soft_forward_and_a_unit_mean_gradient():
    w = torch.randn(4000, generator=torch.Generator().manual_seed(0)).requires_grad_()
    for lam in (5.0, 50.0, 500.0):
        soft = shift_soft(w, 3, lam)
        (slope,) = torch.autograd.grad(soft.sum(), w)
        assert torch.allclose(shift_slope(w, 3, lam), slope, rtol=1e-4, atol=1e-6)  # the analytic slope
        scaled = shift_scaled(w, 3, lam)
        assert torch.equal(scaled, soft)
        (grad,) = torch.autograd.grad(scaled.sum(), w)
        assert grad.mean().item() == pytest.approx(1.0, rel=1e-4)


def test_alrs_scales_the_shared_scale_gradient_per_precision():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    grads = {}
    for alrs in (False, True):
        q = DoubleRoundingQuantizer(high=8, alrs=alrs)
        q(w, 8)  # initialise the scale
        for bits in (2, 4):
            q.scale.grad = None
            q(w, bits).sum().backward()
            grads[alrs, bits] = q.scale.grad.item()
    for bits in (2, 4):  # Q_P(8) = 127, Q_P(4) = 7, Q_P(2) = 1; s_l = s_8 2^(8-l)
        q_p = 2 ** (bits - 1) - 1
        expected = math.sqrt(127 / q_p) / 4 ** (8 - bits)
        assert grads[True, bits] / grads[False, bits] == pytest.approx(expected, rel=1e-5)


def test_a_resumed_run_of_every_recipe_at_once_ends_identical(tmp_path):
    """Companion, progressive stages, stochastic blocks and the shift steepness all resume exactly."""
    cfg = load_config(profile="smoke", overrides={**TINY, "train.distill": "joint", "train.progressive": "bits",
                                                  "train.stochastic_precision": 0.5,
                                                  "quant.weight_quantizer": "shift"})
    data = load_data(cfg.data)
    whole = train(cfg, ResultsStore(tmp_path / "a"), device="cpu", progress=False, data=data)
    store = ResultsStore(tmp_path / "b")
    for k in (3, 5):
        train(cfg, store, device="cpu", progress=False, data=data, stop_after=k)
    resumed = train(cfg, store, device="cpu", progress=False, data=data)
    a = torch.load(whole.path / "model.pt", weights_only=True)
    b = torch.load(resumed.path / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["acc"] == whole.summary["acc"]
    assert resumed.summary["sample_passes"] == whole.summary["sample_passes"]


def test_joint_distillation_cannot_be_combined_with_coreset_pruning():
    from emq.config import ConfigError

    with pytest.raises(ConfigError, match="'joint'.*cannot be combined with coreset pruning"):
        load_config(profile="smoke", overrides={**TINY, "train.distill": "joint", "coreset.prune": 0.5})


def test_progressive_bits_with_coreset_pruning_trains_each_child_only_in_its_stages(tmp_path):
    cfg = load_config(profile="smoke", overrides={**TINY, "train.epochs": 4, "train.progressive": "bits",
                                                  "coreset.prune": 0.5, "coreset.warmup_epochs": 1})
    run = train(cfg, ResultsStore(tmp_path), device="cpu", progress=False, data=load_data(cfg.data))
    passes = {k: v["forward"] for k, v in run.summary["sample_passes"].items()}
    # 4 epochs: 4 full-data steps of 32, then 3 epochs of 2 steps on 64-image subsets; 10 steps in 4 stages
    steps = run.summary["steps"]
    assert steps == 4 + 3 * 2
    stages = [min(3, s * 4 // steps) for s in range(steps)]
    expected = {b: sum(32 for s in stages if s >= i) for i, b in enumerate(("32", "8", "4", "2"))}
    assert passes == expected
