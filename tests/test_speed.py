"""Speed options (bf16 autocast, channels-last, torch.compile): off on the CPU by default, so
stored runs keep their numbers and hashes; each option exercised here on the CPU (compile with
the aot_eager backend, which traces the same graphs as inductor without generating code)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_1_EPOCH as TINY
from conftest import needs_data

import emq.training.speed
from emq.config import TrainConfig, load_config
from emq.data.load import load_data
from emq.nn.models import build_model
from emq.results import ResultsStore
from emq.training.loop import train
from emq.training.speed import Speed, autocast, prepare_input, prepare_model, resolve_speed

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT / "data"


def test_auto_is_on_for_cuda_and_off_on_the_cpu():
    assert resolve_speed(TrainConfig(), "cpu") == Speed(False, False, False)
    assert resolve_speed(TrainConfig(), "cuda") == Speed(True, True, True)
    assert resolve_speed(TrainConfig(amp="bf16", channels_last="on", compile="off"), "cpu") == Speed(True, True, False)
    assert resolve_speed(TrainConfig(amp="off", channels_last="off", compile="off"), "cuda") == Speed()


@needs_data
def test_bf16_autocast_runs_the_forward_in_bf16_and_trains(tmp_path):
    cfg = load_config(profile="smoke", overrides={**TINY, "train.amp": "bf16"})
    data = load_data(cfg.data)
    model = build_model(cfg, data).train()
    x, _, _ = next(data.train.batches(8))
    with autocast(Speed(amp=True), "cpu"):
        assert model(x).dtype == torch.bfloat16
    bf16 = train(cfg, ResultsStore(tmp_path), device="cpu", progress=False, data=data)
    fp32 = train(cfg.with_overrides({"train.amp": "off"}), ResultsStore(tmp_path), device="cpu", progress=False,
                 data=data)
    assert bf16.env["speed"]["amp"] is True and fp32.env["speed"]["amp"] is False
    assert all(torch.isfinite(torch.tensor(v)) for v in bf16.metrics()[-1]["loss"].values())
    w16, w32 = (torch.load(r.path / "model.pt", weights_only=True)["stem.weight"] for r in (bf16, fp32))
    assert not torch.equal(w16, w32) and torch.allclose(w16, w32, atol=0.05)  # an effect, and a small one


@needs_data
def test_channels_last_computes_the_same_function():
    cfg = load_config(profile="smoke", overrides=TINY)
    data = load_data(cfg.data)
    model = build_model(cfg, data).eval()
    x, _, _ = next(data.train.batches(8))
    ref = model(x)
    fast = prepare_model(model, Speed(channels_last=True))
    assert fast.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fast(prepare_input(x, Speed(channels_last=True))), ref, atol=1e-5)


@needs_data
def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setattr(emq.training.speed, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    cfg = load_config(profile="smoke", overrides={**TINY, "train.compile": "on"})
    data = load_data(cfg.data)
    compiled = train(cfg, ResultsStore(tmp_path), device="cpu", progress=False, data=data)
    eager = train(cfg.with_overrides({"train.compile": "off"}), ResultsStore(tmp_path), device="cpu", progress=False,
                  data=data)
    assert compiled.env["speed"]["compile"] is True
    wc, we = (torch.load(r.path / "model.pt", weights_only=True) for r in (compiled, eager))
    assert wc.keys() == we.keys()  # the saved state is the model's, not the compiled wrapper's
    for k in wc:
        assert torch.allclose(wc[k].float(), we[k].float(), atol=1e-4), k


def test_throughput_rows_hold_the_figures_of_the_issue(monkeypatch, capsys):
    import emq.bench

    monkeypatch.setitem(emq.bench.THROUGHPUT_MODELS, "tiny", {"resnet20": ("resnet", 8, 4, 10)})
    rows = emq.bench.throughput("tiny", "cpu", repeats=1, compile_=False, bits=(2, 32))
    assert [(r["model"], r["bf16"]) for r in rows] == [("resnet20", False), ("resnet20", True)]
    for r in rows:
        assert r["multi_s"] > 0 and r["fp_s"] > 0
        assert r["overhead"] == pytest.approx(r["multi_s"] / (2 * r["fp_s"]))
        assert r["epoch_s"] == pytest.approx(50_000 / 4 * r["multi_s"])
    emq.bench.print_throughput(rows, "cpu", bits=(2, 32))
    assert "overhead = multi / (2 x fp)" in capsys.readouterr().out


def test_the_activation_bench_patches_its_reference_into_every_module_that_calls_the_quantizer():
    import importlib
    import pkgutil

    import emq
    from emq.bench import ACTIVATION_CALLERS
    from emq.quant.quantizers import quantize_activation

    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(emq.__path__, "emq.")
               if not m.name.endswith("__main__")]
    callers = {m.__name__ for m in modules if getattr(m, "quantize_activation", None) is quantize_activation}
    assert callers - {"emq.quant.quantizers"} == {m.__name__ for m in ACTIVATION_CALLERS}


def test_bench_is_a_subcommand_of_the_cli(capsys):
    from emq.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0 and "--throughput" in capsys.readouterr().out


def test_the_budget_gives_the_runners_time_for_every_chapter_grid_and_for_the_whole_book(capsys):
    from emq.bench import print_budget
    from emq.book.grids import CHAPTER_GRIDS

    print_budget("cpu")
    lines = capsys.readouterr().out.splitlines()
    totals = [line for line in lines[1:] if not line.lstrip().startswith("group ")]
    named = {line.split()[0] for line in totals}
    assert set(CHAPTER_GRIDS) <= named and lines[-1].lstrip().startswith("every chapter ")
    # every run committed, and each total both from the recorded wall times and at the runs' faster pace
    assert all("(0 not in the store)" in line and line.count("runner") == 2 for line in totals)
    # and the core of every chapter with an extended tier, on fewer runs
    assert {"02_shared_bn,", "04_coreset_pruning,", "06_methods,"} <= named
    runs = {m[1]: int(m[2]) for m in (re.match(r"\s*(.+?)\s+(\d+) runs ", line) for line in totals)}
    assert runs["every chapter but 00_scale, core"] < runs["every chapter but 00_scale"]
    groups = {line.split()[1] for line in lines[1:] if line.lstrip().startswith("group ")}
    assert {"doubling", "verdict", "per_bit", "shift_capped"} <= groups


@needs_data
def test_the_budget_check_retrains_a_committed_run_and_sets_its_time_now_beside_both_estimates(tmp_path):
    from emq.bench import budget_check
    from emq.book.grids import grid_configs, train_all
    from emq.results import ResultsStore

    store = ResultsStore(tmp_path)
    cheapest = min(grid_configs("03_knowledge_transfer", "smoke"), key=lambda c: len(c.train.bits))
    train_all([cheapest], store, jobs=1, echo=lambda line: None)
    (row,) = budget_check("smoke", runs=3, jobs=1, store=store)  # the one run this store has
    assert row["hash"] == cheapest.hash() and row["kind"].startswith("shared_meanvar, 1 bits")
    assert row["now_s"] > 0 and 0 < row["paced_s"] <= row["recorded_s"]
    assert row["same_acc"]  # retrained on the CPU that trained it: the same run, to the last digit


@needs_data
def test_the_budget_check_retrains_first_the_kind_of_run_that_takes_the_largest_share_of_the_budget(tmp_path):
    from emq.bench import budget_check
    from emq.book.grids import grid_configs, paced_seconds, train_all
    from emq.results import ResultsStore

    store = ResultsStore(tmp_path)
    configs = grid_configs("03_knowledge_transfer", "smoke")
    kinds = {len(c.train.bits): c for c in configs}  # a child alone (1 bit-width) and both children (2)
    train_all(list(kinds.values()), store, jobs=1, echo=lambda line: None)
    (row,) = budget_check("smoke", runs=1, jobs=1, store=store)
    assert row["hash"] == max(kinds.values(), key=lambda c: paced_seconds(store.run(c))).hash()
