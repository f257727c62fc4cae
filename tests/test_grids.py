"""Run grids are data: every grid builds at its profiles, each run once, pretraining first; the
runner trains exactly the runs its store lacks, on several processes, and then nothing."""
import json
from pathlib import Path

import pytest
from conftest import TINY_1_EPOCH as TINY
from conftest import needs_data

from emq.book import grids
from emq.book.grids import CHAPTER_GRIDS, GRIDS, Grid, cell, grid_configs, run_grid, runner_seconds
from emq.config import ConfigError, load_config
from emq.profiles import SEEDS
from emq.results import ResultsStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("name", "profile"), [(name, profile) for name in CHAPTER_GRIDS for profile in
                                               ("smoke", "cpu", "gpu") if (name, profile) != ("00_scale", "gpu")]
                         + [("gpu_evidence", "gpu")]
                         + [("02_shared_bn_plateau", "cpu")])
def test_every_grid_lists_each_run_once_with_its_pretraining_run_before_it(name, profile):
    configs = grid_configs(name, profile)
    hashes = [c.hash() for c in configs]
    assert configs and len(set(hashes)) == len(hashes)
    for i, cfg in enumerate(configs):
        if cfg.train.init_from:
            assert cfg.train.init_from in hashes[:i]


@pytest.mark.parametrize("name", [name for name in CHAPTER_GRIDS if name != "00_scale"])
def test_at_the_cpu_profile_a_chapters_grid_is_exactly_the_runs_its_committed_chapter_read(name):
    read = set(json.loads((ROOT / "results" / "chapters" / f"{name}.runs.json").read_text()))
    assert {c.hash() for c in grid_configs(name, "cpu")} == read


def test_the_scale_chapter_read_only_runs_of_its_grid_and_of_chapter_02s_grids():
    read = set(json.loads((ROOT / "results" / "chapters" / "00_scale.runs.json").read_text()))
    grids_ = [grid_configs(name, "cpu") for name in ("00_scale", "02_shared_bn_plateau", "02_shared_bn")]
    assert read and read <= {c.hash() for configs in grids_ for c in configs}


def test_make_runs_trains_every_chapters_grid_and_the_scale_study_with_the_extended_tiers():
    lines = (ROOT / "Makefile").read_text().splitlines()
    grids_, scale = ([x.split(":=")[1].split() for x in lines if x.startswith(f"{name} :=")][0]
                     for name in ("GRIDS", "SCALE_GRID"))
    assert sorted(grids_ + scale) == sorted(CHAPTER_GRIDS) and scale == ["00_scale"]
    assert "emq grid $(GRIDS) $(if $(EXTENDED),$(SCALE_GRID)) " in "\n".join(lines)  # one queue
    # chapter 05 trains through torchrun (its runbook), the synthesis trains nothing
    assert set(CHAPTER_GRIDS) == {p.stem for p in (ROOT / "book").glob("0*.ipynb")} - {"05_full_scale", "07_synthesis"}
    assert "gpu_evidence" in GRIDS and "gpu_evidence" not in CHAPTER_GRIDS


def test_chapter_02s_plateau_grid_trains_its_four_treatments_on_all_images_with_three_seeds():
    configs = grid_configs("02_shared_bn_plateau", "cpu")
    assert {(c.data.train_size, c.data.test_size, c.train.epochs) for c in configs} == {(0, 0, 4)}
    methods = [c for c in configs if c.train.bits == (2, 4, 8, 32)]
    assert len(methods) == 12 and {c.train.seed for c in methods} == {0, 1, 2}
    assert len(configs) == 13  # and one run trained on every bit-width


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_chapter_04_trains_one_network_per_bit_width_beside_its_multi_bit_baseline(profile):
    groups = grids.grid_of("04_coreset_pruning", profile).groups
    baseline_seeds = set(groups["baseline"])
    assert set(groups["per_bit"]) == {(b, s) for b in (2, 4, 8, 32) for s in baseline_seeds}
    assert {c.overrides for c in groups["per_bit"].values()} == {
        (("train.seed", s), ("train.bits", (b,))) for b in (2, 4, 8, 32) for s in baseline_seeds}


def test_the_runner_queues_the_cheapest_runs_first_counting_images_epochs_and_bit_widths():
    base = load_config(profile="cpu")
    fp_small = base.with_overrides({"train.bits": (32,), "data.train_size": 2458, "train.epochs": 32})
    multi_small = fp_small.with_overrides({"train.bits": (2, 4, 8, 32)})
    multi_all = multi_small.with_overrides({"data.train_size": 0, "train.epochs": 4})  # 0: all 60,000 images
    assert grids.run_cost(multi_all) == 60_000 * 4 * 4
    assert sorted([multi_all, multi_small, fp_small], key=grids.run_cost) == [fp_small, multi_small, multi_all]


def test_an_unknown_grid_or_profile_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="unknown grid 'nope'"):
        grid_configs("nope", "cpu")
    with pytest.raises(ConfigError, match="has no 'gpu' profile"):
        grid_configs("00_scale", "gpu")


def test_the_scale_grid_varies_epochs_and_training_set_size_for_full_precision_and_multi_bit():
    configs = [c.configs(load_config(profile="cpu"))[-1] for c in grids.grid_of("00_scale", "cpu").cells("scale")]
    multibit = {(c.quant.norm, c.data.train_size, c.train.epochs) for c in configs if c.train.bits != (32,)}
    assert {(n, 6144, e) for n in ("switchable", "shared") for e in (8, 16, 32)} <= multibit
    fp_sizes = {c.data.train_size for c in configs if c.train.bits == (32,)}
    assert fp_sizes == {2458, 6144, 24576, 0}  # 2458: 40 % of 6144
    assert all(c.data.test_size == 0 for c in configs)  # all 10k test images: a 0.5 pp plateau is resolvable


def test_the_doubling_check_is_the_chapters_own_runs_at_48_and_96_epochs():
    doubling = grids.grid_of("00_scale", "cpu").groups["doubling"]
    base = load_config(profile="cpu")
    run = {key: c.configs(base)[-1] for key, c in doubling.items()}
    chapter = {name: {c.hash() for c in grid_configs(name, "cpu")} for name in ("02_shared_bn", "04_coreset_pruning")}
    short, long = grids.DOUBLING["cpu"][1]
    assert short == grids.CPU_SCALE["train.epochs"] and long == 2 * short == grids.CPU_LONG_SCALE["train.epochs"]
    for (method, epochs, seed), cfg in run.items():
        # chapter 02's methods at its 96 epochs; chapter 04's baseline and random 40 % at its 48
        if epochs == long:
            assert (cfg.hash() in chapter["02_shared_bn"]) == (method != "random 40 %"), (method, epochs, seed)
            # the same run but for its length (and the pruned run's warm-up, 1/12 of it)
            same = run[method, short, seed].with_overrides({"train.epochs": long,
                                                            "coreset.warmup_epochs": cfg.coreset.warmup_epochs})
            assert same.hash() == cfg.hash()
        elif method in ("shared_meanvar", "random 40 %"):
            assert cfg.hash() in chapter["04_coreset_pruning"], (method, epochs, seed)
    pruned = {e: run["random 40 %", e, 0].coreset.warmup_epochs for e in (short, long)}
    assert pruned[long] == 2 * pruned[short] > 0


def test_chapter_06s_verdict_is_doubled_on_its_own_runs_of_lsq_and_the_baseline():
    verdict = grids.grid_of("00_scale", "cpu").groups["verdict"]
    base = load_config(profile="cpu")
    run = {key: c.configs(base)[-1] for key, c in verdict.items()}
    methods = grids.grid_of("06_methods", "cpu")
    chapter = {key: c.configs(methods.base(base))[-1].hash() for key, c in methods.groups["methods"].items()}
    short, long = grids.VERDICT_LENGTHS["cpu"]
    assert short == grids.CPU_LONG_SCALE["train.epochs"] and long == 2 * short
    named = {"switchable": "any_precision", "lsq": "lsq"}  # any_precision is switchable BN
    for (method, epochs, seed), cfg in run.items():
        if epochs == short:
            assert cfg.hash() == chapter[named[method], seed]
        else:
            assert cfg.with_overrides({"train.epochs": short}).hash() == chapter[named[method], seed]


def test_chapter_02s_second_claim_is_doubled_on_its_own_runs_of_mean_var_correction_and_switchable_bn():
    doubled = grids.grid_of("00_scale", "cpu").groups["bn_verdict"]
    base = load_config(profile="cpu")
    claims = grids.grid_of("02_shared_bn", "cpu")
    chapter = {key: c.configs(claims.base(base))[-1].hash() for key, c in claims.groups["methods"].items()}
    short, long = grids.VERDICT_LENGTHS["cpu"]
    for (method, epochs, seed), c in doubled.items():
        cfg = c.configs(base)[-1]
        assert method in ("switchable", "shared_meanvar") and epochs in (short, long)
        assert cfg.with_overrides({"train.epochs": short}).hash() == chapter[method, seed]


@needs_data
def test_the_runner_trains_the_missing_runs_on_two_processes_then_nothing(tmp_path, monkeypatch):
    # a grid registered for this test only (undone after it)
    monkeypatch.setitem(grids.GRIDS, "tiny", lambda profile: Grid({"all": {
        "fp": cell("full_precision"), "shift": cell("shift"), "ap": cell("any_precision", train_seed=1)}}))
    base = load_config(profile="smoke", overrides=TINY)
    store = ResultsStore(tmp_path)
    lines = []
    trained = run_grid("tiny", "smoke", store, jobs=2, base=base, echo=lines.append)
    configs = grid_configs("tiny", "smoke", base)
    assert len(configs) == 3  # shift's pretraining run is full_precision's run
    assert sorted(trained) == sorted(c.hash() for c in configs) and all(store.is_finished(c) for c in configs)
    assert lines[0].endswith("3 to train with 2 process(es) x 1 thread(s)") and len(lines) == 4
    again = []
    assert run_grid("tiny", "smoke", store, jobs=2, base=base, echo=again.append) == []
    assert again == ["grid tiny at smoke: 3 runs, 3 in the store, 0 to train with 2 process(es) x 1 thread(s)"]


def test_the_gpu_evidence_command_lists_chapter_02s_grid_on_all_images_with_resnet_20_in_a_dry_run(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["make", "-s", "gpu-evidence", "DRY_RUN=1", f"GPU_PY={sys.executable}"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    configs = grid_configs("gpu_evidence", "gpu")
    assert [line.split()[0] for line in lines] == [c.hash() for c in configs]
    assert {(c.model.depth, c.model.width, c.data.train_size, c.data.name) for c in configs} == {(20, 1.0, 0,
                                                                                                  "fashion_mnist")}
    assert sorted({c.train.seed for c in configs}) == [0, 1, 2] and len(configs) == 12


def test_the_runners_time_is_computed_from_the_recorded_wall_times_in_its_order_on_its_workers(tmp_path):
    store = ResultsStore(tmp_path)
    base = load_config(profile="smoke")
    a, b, c = (base.with_overrides({"train.seed": s}) for s in (0, 1, 2))
    tuned = base.with_overrides({"train.init_from": a.hash(), "train.epochs": 2})  # costs more: runs last
    for cfg, seconds in ((a, 10.0), (b, 30.0), (c, 20.0), (tuned, 5.0)):
        (store.path_of(cfg)).mkdir(parents=True)
        (store.path_of(cfg) / "summary.json").write_text(json.dumps({"wall_time_s": seconds}))
    missing = base.with_overrides({"train.seed": 3})
    # two workers: a (0-10) and b (0-30); c on the first free one (10-30); tuned after a (30-35)
    assert runner_seconds([a, b, c, tuned, missing], store, jobs=2) == (35.0, 1)
    assert runner_seconds([a, b, c, tuned], store, jobs=1) == (65.0, 0)


def _run_with_epochs(store, cfg, seconds, tested_every=4, steps=10):
    """A finished run whose epochs took ``seconds`` each, tested after every ``tested_every``-th."""
    path = store.path_of(cfg)
    path.mkdir(parents=True)
    rows, t = [], 0.0
    for e, d in enumerate(seconds, 1):
        t += d
        rows.append({"epoch": e, "step": steps * e, "elapsed_s": t,
                     **({"test_acc": {"32": 0.5}} if e % tested_every == 0 else {})})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"wall_time_s": t}))
    return store.run(cfg)


def test_a_runs_paced_time_is_its_time_at_the_pace_of_its_faster_epochs(tmp_path):
    store = ResultsStore(tmp_path)
    base = load_config(profile="smoke")
    # eight epochs of 1 s, of which the last four were slowed to 3 s by other workers: 16 s at the pace of 8 s
    slowed = _run_with_epochs(store, base, [1, 1, 1, 1, 3, 3, 3, 3], tested_every=100)
    assert grids.recorded_seconds(slowed) == 16 and grids.paced_seconds(slowed) == pytest.approx(8)
    # a run that was never slowed keeps its time, its evaluations (timed in the epoch after them) included
    steady = _run_with_epochs(store, base.with_overrides({"train.seed": 1}), [1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1])
    assert grids.paced_seconds(steady) == grids.recorded_seconds(steady) == 14
    # a pruned run's long full-data epochs and short pruned ones are paced each among their own kind
    cfg = base.with_overrides({"train.seed": 2})
    pruned = store.path_of(cfg)
    pruned.mkdir(parents=True)
    ends = [(2, 10), (4, 20), (4.5, 21), (5, 22), (5.5, 23), (6, 24)]
    (pruned / "metrics.jsonl").write_text("".join(json.dumps({"elapsed_s": t, "step": s}) + "\n" for t, s in ends))
    (pruned / "summary.json").write_text(json.dumps({"wall_time_s": 6}))
    assert grids.paced_seconds(store.run(cfg)) == 6


def test_a_grid_trained_with_set_overrides_every_runs_key_and_keeps_each_runs_own_settings():
    plain, narrow = grid_configs("06_methods", "cpu"), grid_configs("06_methods", "cpu", overrides=["model.width=0.25"])
    assert {c.model.width for c in plain} == {0.5} and {c.model.width for c in narrow} == {0.25}

    def rest(c):  # all but the width, and the source of a fine-tuned run (whose hash has the width)
        d = c.to_dict()
        del d["model"]["width"], d["train"]["init_from"]
        return d

    assert [rest(c) for c in narrow] == [rest(c) for c in plain]
    with pytest.raises(ConfigError, match="did you mean 'model.width'"):
        grid_configs("06_methods", "cpu", overrides=["model.widht=0.25"])


def test_the_grid_command_lists_the_runs_with_its_set_overrides_and_refuses_an_unknown_key_in_one_line(capsys,
                                                                                                       tmp_path):
    from emq.cli import main

    args = ["grid", "06_methods", "--list", "--results", str(tmp_path)]
    assert main([*args, "--set", "model.width=0.25"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    expected = [cfg.hash() for _, stages in grids.grid_stages("06_methods", "cpu", overrides=["model.width=0.25"])
                for cfg in stages]
    assert [row[0] for row in listed] == expected and {row[1] for row in listed} == {"missing"}
    core = {c.hash() for c in grid_configs("06_methods", "cpu", overrides=["model.width=0.25"], extended=False)}
    assert {row[0] for row in listed if row[2] == "core"} == core and len(core) < len(listed)
    assert main([*args, "--set", "model.widht=0.25"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'model.widht'" in err


@pytest.mark.parametrize("profile", ["smoke", "cpu"])
def test_the_budgeted_core_keeps_every_headline_comparison_with_every_seed_and_the_extended_tier_the_rest(profile):
    seeds = set(SEEDS[profile])

    def tier(name, extended):  # group -> key without its seed -> seeds, of the cells of one tier
        grid = grids.grid_of(name, profile)
        out = {}
        for group, cells in grid.groups.items():
            for key in cells:
                if grid.is_extended(group, key) == extended:
                    *rest, seed = key if isinstance(key, tuple) else (key,)
                    out.setdefault(group, {}).setdefault(tuple(rest), set()).add(seed)
        return out

    # chapter 02: switchable BN, shared BN and shared BN + mean+var with every seed; extended: the mean-only
    # correction and the all-bit-widths control
    core, extended = tier("02_shared_bn", False), tier("02_shared_bn", True)
    assert core["methods"] == dict.fromkeys([("switchable",), ("shared",), ("shared_meanvar",)], seeds)
    assert extended["methods"] == {("shared_mean",): seeds} and set(extended["all_bits"]) == {()}
    # chapter 04: the baseline, one network per bit-width, and static EL2N and random at two ratios, all with
    # every seed; extended: the other scores and modes (one seed), and at the cpu profile the gentlest ratio
    core, extended = tier("04_coreset_pruning", False), tier("04_coreset_pruning", True)
    assert set(core) == {"baseline", "pruned", "per_bit"}
    assert all(s == seeds for group in core.values() for s in group.values())
    assert {name for name, _ in core["pruned"]} == {"el2n, static", "random, static"}
    assert len({p for _, p in core["pruned"]}) == 2
    assert {name for name, _ in extended["pruned"]} >= {"grand, static", "loss, static", "el2n, dynamic"}
    assert (("el2n, static", 0.3) in extended["pruned"]) == (profile == "cpu")
    # chapter 06: the two baselines, a learned quantizer and the full-precision reference with every seed;
    # extended: Double Rounding and shift-bit, capped or not
    core, extended = tier("06_methods", False), tier("06_methods", True)
    assert {"any_precision", "emq", "lsq", "full_precision"} <= {m for m, in core["methods"]}
    assert all(s == seeds for s in core["methods"].values()) and "shift_capped" not in core
    assert set(extended["methods"]) == {("double_rounding",), ("shift",)} and extended["shift_capped"] == {(): seeds}


def test_the_gpu_profile_has_no_extended_tier():
    for name in CHAPTER_GRIDS:
        if name != "00_scale":
            assert grids.grid_of(name, "gpu").extended == frozenset()


@needs_data
def test_a_chapter_reads_the_extended_tier_only_once_the_runner_has_trained_it(tmp_path, monkeypatch):
    from emq.book.chapter import Chapter

    monkeypatch.setitem(grids.GRIDS, "tiny", lambda profile: Grid(
        {"all": {"fp": cell("full_precision"), "ap": cell("any_precision")}}, scale=TINY,
        extended=frozenset({("all", "ap")})))
    store = ResultsStore(tmp_path)
    ch = Chapter("tiny", "smoke", results_dir=str(tmp_path))
    runs = ch.runs("tiny")  # trains the core, leaves the extended cell out
    assert list(runs["all"]) == ["fp"] and runs.missing == {"all": ["ap"]}
    assert len(store.runs()) == 1
    base = load_config(profile="smoke")
    assert run_grid("tiny", "smoke", store, jobs=1, base=base, echo=lambda line: None) == []
    assert len(run_grid("tiny", "smoke", store, jobs=1, base=base, echo=lambda line: None, extended=True)) == 1
    runs = Chapter("tiny", "smoke", results_dir=str(tmp_path)).runs("tiny")
    assert list(runs["all"]) == ["fp", "ap"] and runs.missing == {}


@needs_data
def test_several_grids_train_in_one_queue_and_a_run_they_share_once(tmp_path, monkeypatch):
    monkeypatch.setitem(grids.GRIDS, "one", lambda profile: Grid({"all": {"fp": cell("full_precision")}}))
    monkeypatch.setitem(grids.GRIDS, "two", lambda profile: Grid({"all": {
        "fp": cell("full_precision"), "ap": cell("any_precision")}}))
    base = load_config(profile="smoke", overrides=TINY)
    store, lines = ResultsStore(tmp_path), []
    trained = run_grid(("one", "two"), "smoke", store, jobs=2, base=base, echo=lines.append)
    assert len(trained) == 2 and lines[0].startswith("grid one, two at smoke: 2 runs, 0 in the store")
