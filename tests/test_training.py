"""Training on real Fashion-MNIST at tiny scale: determinism, resumption, the results store,
evaluation cache, BN re-estimation and the three distillation modes of METHOD.md §1.

Every run here has 256 training images in batches of 64 (4 steps per epoch) for 2 epochs,
a depth-8 ResNet at width 0.25, and trains on the CPU in about a second.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

import emq.analysis.evaluation
import emq.training.loop
from emq.analysis.evaluation import accuracy_curves, evaluate, evaluate_run, recalibrate_bn
from emq.book.plateau import last_quarter_gain
from emq.config import ConfigError, load_config
from emq.data.load import load_data
from emq.nn.layers import SwitchableBatchNorm2d, set_bits
from emq.nn.models import build_model, load_trained
from emq.results import ResultsStore
from emq.training.distill import soft_cross_entropy
from emq.training.loop import evaluated_epochs, shared_batch, train, train_step

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"
STEPS_PER_EPOCH, TOTAL_STEPS = 4, 8

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
                                reason=f"Fashion-MNIST not under {DATA_ROOT} (python -m emq data fetch)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP spinning makes torch ~100x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(**overrides):
    return load_config(profile="smoke", overrides={**TINY, **overrides})


def run_tiny(store: ResultsStore, data, cfg=None, **kwargs):
    return train(cfg or tiny(), store, device="cpu", progress=False, data=data, **kwargs)


def weights_of(run) -> dict[str, torch.Tensor]:
    return torch.load(run.path / "model.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def comparable_metrics(run) -> list[dict]:
    """Metric rows without wall-clock time, which legitimately differs between runs."""
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in run.metrics()]


@pytest.fixture(scope="module")
def data():
    return load_data(tiny().data)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """The uninterrupted reference run of the tiny config."""
    return run_tiny(ResultsStore(tmp_path_factory.mktemp("reference")), data)


# ---- the finished run --------------------------------------------------------------------------
def test_a_finished_run_has_its_files_and_no_checkpoint(finished):
    assert finished.finished
    names = {p.name for p in finished.path.iterdir() if not p.name.startswith(".")}
    assert {"config.json", "metrics.jsonl", "summary.json", "env.json", "model.pt"} <= names
    assert "checkpoint.pt" not in names
    assert finished.hash == tiny().hash()


def test_metrics_have_one_row_per_epoch(finished):
    rows = finished.metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH, TOTAL_STEPS]
    for r in rows:
        assert set(r["test_acc"]) == set(r["loss"]) == {"2", "4", "8", "32"}


def test_with_eval_every_the_test_set_is_read_every_kth_epoch_the_last_and_where_the_last_quarter_starts(
        data, tmp_path):
    assert evaluated_epochs(32, 8) == {8, 16, 24, 32}
    assert evaluated_epochs(10, 4) == {4, 7, 8, 10}  # 7: the last quarter of 10 epochs starts there
    assert evaluated_epochs(1, 5) == {1} and evaluated_epochs(3, 1) == {1, 2, 3}
    run = run_tiny(ResultsStore(tmp_path), data, tiny(**{"train.epochs": 4, "train.eval_every": 3}))
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and all("loss" in r for r in rows)
    assert [r["epoch"] for r in rows if "test_acc" in r] == [3, 4]
    assert run.summary["acc"] == rows[-1]["test_acc"] and run.summary["best_epoch"] in (3, 4)
    assert last_quarter_gain(run) == pytest.approx(100 * (rows[3]["test_acc"]["32"] - rows[2]["test_acc"]["32"]))
    assert sorted(accuracy_curves({"r": run}, ("run",)).epoch.unique()) == [3, 4]


def test_accuracy_curves_have_a_row_per_evaluated_epoch_and_bit_width_in_percent(finished):
    curves = accuracy_curves({("tiny", 0): finished})
    assert list(curves.columns) == ["method", "seed", "epoch", "bits", "acc"] and len(curves) == 2 * 4
    last = finished.metrics()[-1]["test_acc"]["32"]
    assert curves[(curves.epoch == 2) & (curves.bits == 32)].acc.item() == pytest.approx(100 * last)


def test_summary_has_accuracy_per_trained_bit_width_time_and_sample_passes(finished):
    s = finished.summary
    assert set(s["acc"]) == {"2", "4", "8", "32"}
    assert all(0.0 <= a <= 1.0 for a in s["acc"].values())
    assert s["acc"] == finished.metrics()[-1]["test_acc"]
    assert s["wall_time_s"] > 0
    assert s["steps"] == TOTAL_STEPS and s["train_size"] == 256 and s["test_size"] == 128
    passes = TOTAL_STEPS * 64
    assert s["sample_passes"] == {b: {"forward": passes, "backward": passes} for b in ("2", "4", "8", "32")}


def test_summary_accuracy_is_that_of_the_saved_final_weights(finished, data):
    model = load_trained(finished, data)
    for b, acc in finished.summary["acc"].items():
        assert evaluate(model, data.test, int(b)) == acc


def test_env_records_git_commit_torch_version_and_device(finished):
    env = finished.env
    assert "git_commit" in env and (env["git_commit"] is None or len(env["git_commit"]) == 40)
    assert env["torch"] == torch.__version__
    assert env["device"] == "cpu"


def test_the_store_reopens_a_run_folder_of_the_same_config_and_rejects_an_edited_one(tmp_path):
    store = ResultsStore(tmp_path)
    first = store.run(tiny())
    assert store.run(tiny()).path == first.path  # config.json holds bits as a list, the config a tuple
    assert store.open(first.path).config == tiny().portable()  # the folder does not keep the data root
    stored = first.path / "config.json"
    stored.write_text(stored.read_text().replace('"epochs": 2', '"epochs": 3'))
    with pytest.raises(ConfigError, match="holds another config"):
        store.run(tiny())


# ---- determinism and resumption ----------------------------------------------------------------
def test_two_identical_runs_give_identical_weights_and_metrics(finished, data, tmp_path):
    again = run_tiny(ResultsStore(tmp_path), data)
    assert again.path != finished.path
    assert again.summary["acc"] == finished.summary["acc"]
    assert comparable_metrics(again) == comparable_metrics(finished)
    assert_same_weights(weights_of(again), weights_of(finished))


def test_another_seed_gives_other_weights(finished, data, tmp_path):
    other = run_tiny(ResultsStore(tmp_path), data, tiny(**{"train.seed": 1}))
    a, b = weights_of(other), weights_of(finished)
    assert not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stops", [(2,), (STEPS_PER_EPOCH,), (1, 6), (3, STEPS_PER_EPOCH, 7)],
                         ids=["mid-epoch", "epoch-boundary", "twice", "three-times"])
def test_a_resumed_run_ends_bitwise_identical_to_an_uninterrupted_one(stops, finished, data, tmp_path):
    store = ResultsStore(tmp_path)
    for k in stops:
        run = run_tiny(store, data, stop_after=k)
        assert not run.finished
        ckpt = torch.load(run.path / "checkpoint.pt", weights_only=True)
        assert ckpt["step"] == k and ckpt["config_hash"] == run.hash
        assert [r["step"] for r in run.metrics()] == [s for s in (4, 8) if s <= k]
    resumed = run_tiny(store, data)
    assert resumed.finished and not (resumed.path / "checkpoint.pt").exists()
    assert_same_weights(weights_of(resumed), weights_of(finished))
    assert comparable_metrics(resumed) == comparable_metrics(finished)
    assert resumed.summary["acc"] == finished.summary["acc"]
    assert resumed.summary["sample_passes"] == finished.summary["sample_passes"]


def test_resuming_drops_metric_rows_logged_after_the_checkpoint(finished, data, tmp_path):
    """A crash after an epoch's metrics but before its checkpoint must not duplicate the row."""
    store = ResultsStore(tmp_path)
    run = run_tiny(store, data, stop_after=STEPS_PER_EPOCH + 1)
    run.append_metrics({"epoch": 2, "step": TOTAL_STEPS, "test_acc": {}, "loss": {}})  # a stale row
    resumed = run_tiny(store, data)
    assert comparable_metrics(resumed) == comparable_metrics(finished)


def test_a_finished_run_is_read_back_not_recomputed(finished, data, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr(emq.training.loop, "train_step", boom)
    monkeypatch.setattr(emq.training.loop, "load_data", boom)
    monkeypatch.setattr(emq.training.loop, "build_model", boom)
    files = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished.path.iterdir() if p.is_file()}
    again = train(tiny(), ResultsStore(finished.path.parents[1]), device="cpu", progress=False)
    assert again.path == finished.path and again.finished
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in finished.path.iterdir() if p.is_file()
            and p.name in files} == files


def test_a_checkpoint_of_another_config_is_rejected(data, tmp_path):
    store = ResultsStore(tmp_path)
    other = run_tiny(store, data, tiny(**{"train.seed": 1}), stop_after=1)
    target = store.run(tiny(**{"train.seed": 2}))
    shutil.copy(other.path / "checkpoint.pt", target.path / "checkpoint.pt")
    with pytest.raises(ConfigError, match=f"belongs to config {other.hash}, not {target.hash}") as e:
        run_tiny(store, data, tiny(**{"train.seed": 2}))
    assert "\n" not in str(e.value)
    assert not target.finished and not (target.path / "model.pt").exists()
    assert (target.path / "checkpoint.pt").read_bytes() == (other.path / "checkpoint.pt").read_bytes()


def test_an_unreadable_checkpoint_is_a_config_error(data, tmp_path):
    store = ResultsStore(tmp_path)
    run = store.run(tiny())
    (run.path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        run_tiny(store, data)


def test_a_batch_larger_than_the_training_set_is_a_config_error(data, tmp_path):
    with pytest.raises(ConfigError, match="larger than the 256 training images"):
        run_tiny(ResultsStore(tmp_path), data, tiny(**{"train.batch_size": 512}))


# ---- evaluation --------------------------------------------------------------------------------
def test_evaluations_are_cached_in_evals_json(finished, data, monkeypatch):
    first = evaluate_run(finished, [2, 3], data=data)
    assert set(first) == {2, 3}
    cached = finished.evals()
    assert cached["2/recal0"] == first[2] and cached["3/recal0"] == first[3]
    assert first[2] == finished.summary["acc"]["2"]  # zero-shot at a trained bit-width = the summary

    def boom(*args, **kwargs):
        raise AssertionError("a cached evaluation was recomputed")

    monkeypatch.setattr(emq.analysis.evaluation, "evaluate_bits", boom)
    monkeypatch.setattr(emq.analysis.evaluation, "load_trained", boom)
    assert evaluate_run(finished, [3, 2]) == {3: first[3], 2: first[2]}


def test_evaluations_after_bn_reestimation_are_cached_under_their_own_key(finished, data):
    recal = evaluate_run(finished, [3], recalibrate=2, data=data)
    assert finished.evals()["3/recal2"] == recal[3]
    with pytest.raises(ValueError, match="unsupported bit-width 33"):
        evaluate_run(finished, [2, 33], data=data)


def test_recalibrate_bn_changes_only_the_copys_active_bn_statistics(finished, data):
    model = load_trained(finished, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = recalibrate_bn(model, data.train, bits=3, num_batches=2)  # 3 is untrained: uses the 4-bit BNs
    after = model.state_dict()
    for k in before:
        assert torch.equal(after[k], before[k]), f"the original model changed: {k}"
    assert copy is not model and not copy.training
    changed = set()
    for (name, orig), (_, new) in zip(model.named_modules(), copy.named_modules()):
        if not isinstance(orig, SwitchableBatchNorm2d):
            continue
        for b in orig.bns:
            same = torch.equal(orig.bns[b].running_mean, new.bns[b].running_mean)
            assert torch.equal(orig.bns[b].weight, new.bns[b].weight)
            if not same:
                changed.add(b)
            assert same == (b != "4"), f"{name}.bns[{b}]"
    assert changed == {"4"}
    for (k, p), (_, q) in zip(model.named_parameters(), copy.named_parameters()):
        assert torch.equal(p, q), f"recalibration changed weight {k}"


def test_recalibrated_statistics_are_plain_averages_over_the_batches(finished, data):
    """The stem's BN sees the (full-precision) stem output: its re-estimated running mean is
    the average over the batches of the per-batch channel means."""
    model = load_trained(finished, data)
    copy = recalibrate_bn(model, data.train, bits=2, num_batches=3, batch_size=64, seed=5)
    means = [model.stem(x).mean(dim=(0, 2, 3)) for x, _, _ in
             list(data.train.batches(64, shuffle=True, seed=5))[:3]]
    bn = copy.stem_bn.bns["2"]
    assert int(bn.num_batches_tracked) == 3
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)


# ---- the training step and distillation modes --------------------------------------------------
@pytest.fixture(scope="module")
def batch(data):
    x, y, _ = next(data.train.batches(64, shuffle=True, seed=0))
    return x, y


def expected_losses(model, x, y, bits, distill) -> dict[int, torch.Tensor]:
    """METHOD.md §1 written out: highest bit-width from labels; the others from the labels
    (hard), the detached softmax of the next-higher bit-width (recursive) or of the highest (soft)."""
    order = sorted(bits, reverse=True)
    logits = {b: set_bits(model, b)(x) for b in order}
    out = {}
    for i, b in enumerate(order):
        if i == 0 or distill == "hard":
            out[b] = F.cross_entropy(logits[b], y)
        else:
            teacher = order[i - 1] if distill == "recursive" else order[0]
            p = F.softmax(logits[teacher].detach(), dim=1)
            out[b] = -(p * F.log_softmax(logits[b], dim=1)).sum(1).mean()
    return out


@pytest.mark.parametrize("distill", ["recursive", "hard", "soft"])
def test_the_step_losses_and_accumulated_gradients_follow_the_distill_mode(distill, data, batch):
    x, y = batch
    cfg = tiny(**{"train.distill": distill})
    model = build_model(cfg, data).train()
    losses, _ = train_step(model, shared_batch(x, y, cfg.train.bits), distill)
    assert list(losses) == [32, 8, 4, 2]  # high to low
    step_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want = expected_losses(model, x, y, cfg.train.bits, distill)
    for b, loss in want.items():
        assert losses[b] == pytest.approx(loss.item(), rel=1e-5)
    sum(want.values()).backward()  # one optimizer step takes the sum of all bit-widths' gradients
    for k, p in model.named_parameters():
        assert torch.allclose(step_grads[k], p.grad, rtol=1e-4, atol=1e-6), k


def test_distill_modes_differ_below_the_top_bit_width(data, batch):
    x, y = batch
    losses = {d: train_step(build_model(tiny(), data).train(), shared_batch(x, y, (2, 4, 8, 32)), d)[0]
              for d in ("recursive", "hard", "soft")}
    assert losses["recursive"][32] == losses["hard"][32] == losses["soft"][32]
    assert losses["recursive"][8] == losses["soft"][8]  # 8 learns from 32 in both
    assert losses["recursive"][2] != losses["soft"][2] != losses["hard"][2]


@pytest.mark.parametrize("distill", ["recursive", "hard", "soft"])
def test_each_distill_mode_trains(distill, data, batch):
    x, y = batch
    cfg = tiny(**{"train.distill": distill})
    model = build_model(cfg, data).train()
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fp_loss = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        fp_loss.append(train_step(model, shared_batch(x, y, cfg.train.bits), distill)[0][32])
        opt.step()
    assert fp_loss[-1] < fp_loss[0]
    assert all(not torch.equal(p, start[k]) for k, p in model.named_parameters())


def test_soft_cross_entropy_against_a_one_hot_target_is_cross_entropy():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 9, 2, 2])
    assert soft_cross_entropy(logits, F.one_hot(y, 10).float()).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6)


def test_a_training_run_of_each_distill_mode_finishes(data, tmp_path):
    store = ResultsStore(tmp_path)
    for distill in ("hard", "soft"):
        run = run_tiny(store, data, tiny(**{"train.distill": distill, "train.epochs": 1}))
        assert run.finished and set(run.summary["acc"]) == {"2", "4", "8", "32"}
