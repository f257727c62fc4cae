"""Bit-wise coreset sampling (METHOD.md §3): the scores are their formulas, selection keeps what
it says, the training loop gives every bit-width its own subset, counts every pass, resumes
exactly, and bad input ends with one line and no run folder.

Training runs are tiny (256 Fashion-MNIST images, batches of 64, ResNet-8 at width 0.25).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY as TINY_2_EPOCHS
from conftest import needs_data

from emq.config import ConfigError, ModelConfig, QuantConfig, load_config
from emq.data.load import load_data
from emq.nn.layers import set_bits
from emq.nn.models import make_model
from emq.results import ResultsStore
from emq.training.coresets import (
    LightweightScores,
    Schedule,
    coreset_size,
    cost_ratio,
    el2n,
    grand,
    grand_last,
    loss_score,
    make_schedule,
    select_coreset,
    select_shards,
    total_passes,
)
from emq.training.loop import shared_batch, train, train_step

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"
TINY = {**TINY_2_EPOCHS, "train.epochs": 3}
PRUNED = {"coreset.prune": 0.5, "coreset.warmup_epochs": 1}  # 4 full-data steps, then 2 epochs of 2 steps


def tiny(**overrides):
    return load_config(profile="smoke", overrides={**TINY, **overrides})


def small_model(norm="shared", correction="meanvar", bits=(2, 4, 32)):
    torch.manual_seed(0)
    q = QuantConfig(norm=norm, correction=correction, fp_act="clamp")
    return make_model(ModelConfig(depth=8, width=0.25), q, bits, num_classes=10, in_channels=1)


def sample_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# ---- scores are their formulas ---------------------------------------------------------------------
def test_el2n_is_the_distance_of_the_softmax_to_the_one_hot_label():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 1])
    p = torch.softmax(logits, 1)
    direct = [torch.sqrt(((p[i] - torch.eye(3)[y[i]]) ** 2).sum()) for i in range(2)]
    assert torch.allclose(el2n(logits, y), torch.stack(direct))


def test_loss_score_is_the_per_sample_cross_entropy():
    logits, y = torch.randn(5, 10, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2, 3, 4, 5])
    assert torch.allclose(loss_score(logits, y), torch.stack([F.cross_entropy(logits[i:i + 1], y[i:i + 1])
                                                              for i in range(5)]))


def test_last_layer_grand_is_the_norm_of_the_classifiers_gradient():
    model = small_model().eval()
    x, y = sample_batch()
    with torch.no_grad():
        h = model.features(x)
        closed = grand_last(model.fc(h), h, y)
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model.fc(h[i:i + 1]), y[i:i + 1]).backward()
        ref = torch.sqrt(model.fc.weight.grad.pow(2).sum() + model.fc.bias.grad.pow(2).sum())
        assert closed[i].item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("bits", [2, 32])
@pytest.mark.parametrize("norm, correction", [("shared", "meanvar"), ("switchable", "none")])
def test_batched_grand_equals_a_per_sample_loop_of_autograd(bits, norm, correction):
    """In float64, so that batched and single-sample convolutions round activations alike."""
    model = set_bits(small_model(norm, correction).double().eval(), bits)
    x, y = sample_batch()
    x = x.double()
    batched = grand(model, x, y)
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        ref = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
        assert batched[i].item() == pytest.approx(ref.item(), rel=1e-6)


# ---- selection ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prune", [0.0, 0.3, 0.5, 0.6, 0.7, 0.8])
def test_selection_keeps_exactly_the_highest_scores(prune):
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(1001, generator=g), torch.randint(0, 10, (1001,), generator=g)
    keep = select_coreset(scores, labels, prune)
    k = round((1 - prune) * 1001)
    assert len(keep) == k == coreset_size(labels, prune)
    assert torch.equal(keep, keep.sort().values)
    assert set(keep.tolist()) == set(torch.topk(scores, k).indices.tolist())


@pytest.mark.parametrize("prune", [0.3, 0.6, 0.8])
def test_class_balanced_selection_keeps_the_highest_scores_of_every_class(prune):
    g = torch.Generator().manual_seed(1)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 120, 7, 300])])
    scores = torch.rand(len(labels), generator=g)
    keep = select_coreset(scores, labels, prune, class_balanced=True)
    assert len(keep) == coreset_size(labels, prune, class_balanced=True)
    for c in range(4):
        members = (labels == c).nonzero().flatten()
        k = round((1 - prune) * len(members))
        want = set(members[torch.topk(scores[members], k).indices].tolist())
        assert set(keep.tolist()) & set(members.tolist()) == want


def test_shards_are_disjoint_and_an_offset_picks_the_same_block_for_a_lone_bit_width():
    shards = select_shards(100, 30, (2, 32), 0, torch.Generator().manual_seed(3))
    assert len(shards[2]) == len(shards[32]) == 30 and not set(shards[2].tolist()) & set(shards[32].tolist())
    alone = select_shards(100, 30, (2,), 1, torch.Generator().manual_seed(3))
    assert torch.equal(alone[2], shards[2])
    with pytest.raises(ValueError, match="do not fit"):
        select_shards(100, 40, (2, 4, 32), 0, torch.Generator())


def test_scores_for_a_dataset_of_another_size_are_rejected_in_one_line():
    with pytest.raises(ValueError, match="scores for 10 samples, but the dataset has 12") as e:
        select_coreset(torch.rand(10), torch.zeros(12, dtype=torch.long), 0.5)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("prune", [1.0, -0.1, 1.5])
def test_a_pruning_ratio_outside_0_1_is_rejected(prune):
    with pytest.raises(ValueError, match="outside"):
        select_coreset(torch.rand(10), torch.zeros(10, dtype=torch.long), prune)
    with pytest.raises(ConfigError, match=r"coreset\.prune.*must be in \[0, 1\)"):
        tiny(**{"coreset.prune": prune})


@pytest.mark.parametrize("overrides, message", [
    ({"coreset.prune": 0.5, "coreset.mode": "lightweight", "coreset.score": "grand"}, "el2n or loss"),
    ({"coreset.prune": 0.5, "coreset.warmup_epochs": 3}, "below train.epochs"),
    ({"coreset.score": "gradnorm"}, "use one of el2n, grand"),
    ({"coreset.every": 0}, "must be positive"),
])
def test_bad_coreset_configs_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        tiny(**overrides)
    assert "\n" not in str(e.value)


def test_the_schedule_locates_steps_across_the_warm_up_and_the_pruned_epochs():
    s = Schedule(full_steps=4, sub_steps=2, warmup=1, epochs=3)
    assert s.total == 8
    assert [s.locate(k) for k in range(9)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]


# ---- the training step -----------------------------------------------------------------------------
def test_a_step_on_one_batch_per_bit_width_that_is_the_same_batch_is_the_shared_batch_step():
    x, y = sample_batch(8)
    a, b = small_model(), small_model()
    want, _ = train_step(a.train(), shared_batch(x, y, (2, 4, 32)))
    batch = (x, y, torch.arange(8))
    got, extra = train_step(b.train(), {bits: batch for bits in (2, 4, 32)})
    assert got == want and extra == {32: 0, 4: 0, 2: 0}
    for (k, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p.grad, q.grad), k


@pytest.mark.parametrize("distill, teacher_passes", [("recursive", 8), ("soft", 8), ("hard", 0)])
def test_a_teacher_forward_on_the_childs_own_batch_is_counted(distill, teacher_passes):
    batches = {b: (*sample_batch(8, seed=b), torch.arange(8) + 8 * b) for b in (2, 4, 32)}
    _, extra = train_step(small_model().train(), batches, distill)
    assert extra == {32: 0, 4: teacher_passes, 2: teacher_passes}


def test_lightweight_scores_are_the_el2n_of_the_logits_training_saw():
    light = LightweightScores(10, (2, 32), "el2n")
    logits, y = torch.randn(3, 10), torch.tensor([1, 2, 3])
    light.update(2, torch.tensor([0, 4, 7]), logits, y)
    assert torch.allclose(light.values[2][[0, 4, 7]], el2n(logits, y))
    assert torch.isinf(light.values[2][[1, 2, 3, 5, 6, 8, 9]]).all() and torch.isinf(light.values[32]).all()


# ---- runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    return load_data(tiny().data)


def run(store, data, cfg, **kw):
    return train(cfg, store, device="cpu", progress=False, data=data, **kw)


@needs_data
def test_a_subset_smaller_than_one_batch_is_rejected_and_leaves_no_run_folder(data, tmp_path):
    cfg = tiny(**{"coreset.prune": 0.8})  # keeps 51 of 256 images, batches of 64
    with pytest.raises(ConfigError, match="keeps 51 of 256 training images, fewer than one batch of 64"):
        run(ResultsStore(tmp_path), data, cfg)
    assert not (tmp_path / "runs").exists()


@needs_data
def test_a_static_run_counts_every_pass_it_makes(data, tmp_path):
    r = run(ResultsStore(tmp_path), data, tiny(**PRUNED))
    s = r.summary
    plan, size = make_schedule(r.config, data.train.y)
    assert size == 128 and plan == Schedule(4, 2, 1, 3)
    assert s["steps"] == 8 and s["coreset"] == {"subset_size": 128, "selections": 1, "full_data_steps": 4,
                                                  "subset_steps": 4}
    for b in ("2", "4", "8", "32"):
        assert s["sample_passes"][b]["forward"] == s["sample_passes"][b]["backward"] == 8 * 64
        # the teacher runs on the child's own batch in the 4 pruned steps (not for the top bit-width)
        assert s["sample_passes"][b]["teacher_forward"] == (0 if b == "32" else 4 * 64)
        assert s["scoring_passes_by_bits"][b] == {"forward": 256, "backward": 0}  # one EL2N pass over the data
    assert s["scoring_passes"] == 4 * 256
    assert total_passes(s) == 4 * 2 * 8 * 64 + 3 * 4 * 64 + 4 * 256
    assert [row["subset_size"] for row in r.metrics()] == [256, 128, 128]
    assert 0 < s["eval_time_s"] < s["wall_time_s"] and 0 < s["scoring_time_s"] < s["wall_time_s"]
    kept = torch.load(r.path / "subsets.pt", weights_only=True)
    assert sorted(kept, key=int) == ["2", "4", "8", "32"] and all(len(v) == 128 for v in kept.values())


@needs_data
def test_dynamic_grand_rescoring_counts_forward_and_backward_scoring_passes(data, tmp_path):
    s = run(ResultsStore(tmp_path), data, tiny(**PRUNED, **{"coreset.score": "grand", "coreset.mode": "dynamic",
                                                          "train.bits": (2, 32)})).summary
    assert s["coreset"]["selections"] == 2  # at the start of epochs 2 and 3
    assert s["scoring_passes_by_bits"]["2"] == {"forward": 512, "backward": 512}
    assert s["scoring_passes"] == 2 * 2 * 512


@needs_data
def test_a_full_data_run_costs_the_same_with_or_without_the_coreset_module(data, tmp_path):
    base = run(ResultsStore(tmp_path), data, tiny()).summary
    assert cost_ratio(base, base)["passes"] == 1.0 and total_passes(base) == 2 * 4 * 12 * 64


@needs_data
@pytest.mark.parametrize("extra, stops", [({}, (5,)), ({"coreset.mode": "lightweight", "coreset.every": 1}, (4, 7))],
                         ids=["static-mid-subset-epoch", "lightweight-at-warm-up-end-and-later"])
def test_a_resumed_coreset_run_ends_bitwise_identical_to_an_uninterrupted_one(data, tmp_path, extra, stops):
    cfg = tiny(**PRUNED, **extra)
    whole = run(ResultsStore(tmp_path / "whole"), data, cfg)
    store = ResultsStore(tmp_path / "resumed")
    for k in stops:
        assert not run(store, data, cfg, stop_after=k).finished
    resumed = run(store, data, cfg)
    a = torch.load(whole.path / "model.pt", weights_only=True)
    b = torch.load(resumed.path / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = ("acc", "sample_passes", "scoring_passes", "scoring_passes_by_bits", "coreset")
    assert {k: resumed.summary[k] for k in keep} == {k: whole.summary[k] for k in keep}
