"""The command line, run as a user runs it: ``python -m emq`` in a subprocess.

Bad input ends with a non-zero status and exactly one line on stderr, starting "error:",
and leaves what was already written byte for byte as it was.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"
TINY = ["--profile", "smoke", "--set", f"data.root={DATA_ROOT}", "--set", "data.train_size=128",
        "--set", "data.test_size=64", "--set", "train.epochs=1"]

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
                                reason=f"Fashion-MNIST not under {DATA_ROOT} (python -m emq data fetch)")


def emq(*args, cwd: Path) -> subprocess.CompletedProcess:
    # one intra-op thread: on a busy 2-core machine OpenMP spinning makes torch ~100x slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "emq", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The working directory of every command (so a default ``results/`` never lands in the repo)."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def trained(workdir) -> tuple[Path, Path]:
    """(store, run folder) of a tiny run trained through the command line."""
    store = workdir / "store"
    proc = emq("train", *TINY, "--results", store, "--no-progress", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"run (\S+): 2-bit [\d.]+%, 4-bit [\d.]+%, 8-bit [\d.]+%, 32-bit [\d.]+%", line)
    assert m, line
    run_dir = Path(m.group(1))
    if not run_dir.is_absolute():
        run_dir = workdir / run_dir
    assert (run_dir / "summary.json").is_file()
    return store, run_dir


def test_train_then_eval_with_bn_reestimation_prints_a_line_per_bit_width(trained, workdir):
    _, run_dir = trained
    proc = emq("eval", run_dir, "--bits", "2,3", "--recalibrate-bn", "2", "--data-root", DATA_ROOT, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"run {run_dir} (BN re-estimated on 2 batches)"
    rows = [re.fullmatch(r"\s*(\d+)-bit\s+([\d.]+)%\s+(trained|not trained)", line) for line in lines[1:]]
    assert all(rows), lines
    assert [(int(r[1]), r[3]) for r in rows] == [(2, "trained"), (3, "not trained")]
    evals = json.loads((run_dir / "evals.json").read_text())
    assert [round(100 * evals[k], 2) for k in ("2/recal2", "3/recal2")] == [float(r[2]) for r in rows]


def test_training_the_same_config_again_reads_the_finished_run_back(trained, workdir):
    store, run_dir = trained
    before = files_of(run_dir)
    proc = emq("train", *TINY, "--results", store, "--no-progress", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"run {run_dir}:")
    assert files_of(run_dir) == before


BAD_INPUT = {
    "unknown config key": (["train", *TINY, "--set", "train.epoch=3"], ["unknown config key 'train.epoch'",
                                                                        "did you mean 'train.epochs'?"]),
    "bad type": (["train", *TINY, "--set", "train.epochs=three"], ["config key 'train.epochs'", "'three'"]),
    # a run not yet in the store (a finished one is read back and needs no data)
    "missing dataset root": (["train", *TINY, "--set", "data.root=/nonexistent", "--set", "train.seed=5"],
                             ["/nonexistent"]),
    "missing dataset root of eval": (["eval", "{run}", "--bits", "3", "--data-root", "/nonexistent"], ["/nonexistent"]),
    "not a run folder": (["eval", "{empty}"], ["is not a run folder"]),
    "unfinished run": (["eval", "{unfinished}"], ["has not finished"]),
    "negative recalibration": (["eval", "{run}", "--recalibrate-bn", "-1"], ["--recalibrate-bn"]),
    "unknown bit-width in --bits": (["eval", "{run}", "--bits", "2,33"], ["unsupported bit-width 33"]),
    "unknown device": (["eval", "{run}", "--device", "nonsense"], ["nonsense"]),
    "unregistered method": (["train", *TINY, "--method", "dorefa_plus"], ["unknown method 'dorefa_plus'",
                                                                        "any_precision", "double_rounding"]),
    "bit-width the method cannot do": (["train", *TINY, "--method", "shift", "--set", "train.bits=1,4,32"],
                                       ["'shift' cannot do 1-bit"]),
    "resume without a checkpoint": (["train", *TINY, "--set", "train.seed=7", "--resume"],
                                    ["--resume: run", "has no checkpoint"]),
    "pruning ratio outside [0, 1)": (["train", *TINY, "--set", "coreset.prune=1.0"], ["'coreset.prune'", "[0, 1)"]),
    "coreset smaller than one batch": (["train", *TINY, "--set", "coreset.prune=0.6",
                                        "--set", "coreset.warmup_epochs=0"],
                                       ["keeps 51 of 128 training images, fewer than one batch of 64"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_nonzero_with_one_error_line_and_touches_nothing(case, trained, workdir, tmp_path):
    store, run_dir = trained
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_dir / "config.json", unfinished / "config.json")
    (tmp_path / "empty").mkdir()
    args, fragments = BAD_INPUT[case]
    args = [a.format(run=run_dir, empty=tmp_path / "empty", unfinished=unfinished) for a in args]
    if args[0] == "train":
        args += ["--results", store, "--no-progress"]
    before = files_of(store)
    proc = emq(*args, cwd=workdir)
    assert proc.returncode != 0
    assert {k: v for k, v in files_of(store).items() if k in before} == before
    assert_one_error_line(proc, *fragments)


def test_a_bad_bit_width_does_not_modify_a_finished_run(trained, workdir):
    _, run_dir = trained
    before = files_of(run_dir)
    proc = emq("eval", run_dir, "--bits", "2,33", cwd=workdir)
    assert proc.returncode != 0 and "unsupported bit-width 33" in proc.stderr
    assert files_of(run_dir) == before


def test_methods_lists_every_registered_method(workdir):
    from emq.methods import METHODS

    proc = emq("methods", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == list(METHODS)


def test_a_method_with_a_pretraining_stage_trains_it_first(workdir, tmp_path):
    proc = emq("train", *TINY, "--method", "shift", "--results", tmp_path, "--no-progress", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"run \S+: 32-bit [\d.]+%", lines[0]), lines
    assert re.fullmatch(r"run \S+: 2-bit [\d.]+%, 4-bit [\d.]+%, 8-bit [\d.]+%, 32-bit [\d.]+%", lines[1]), lines
    fine = json.loads((Path(lines[1].split()[1].rstrip(":")) / "config.json").read_text())
    assert fine["train"]["init_from"] == Path(lines[0].split()[1].rstrip(":")).name
    assert fine["quant"]["weight_quantizer"] == "shift"


def test_no_command_is_a_usage_error(workdir):
    proc = emq(cwd=workdir)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_as_an_uninterrupted_one(workdir, tmp_path):
    import signal
    import time

    import torch

    args = [*TINY, "--set", "train.epochs=20", "--set", "train.batch_size=16", "--no-progress"]  # 160 steps
    uninterrupted = emq("train", *args, "--results", tmp_path / "a", cwd=workdir)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    store = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "emq", "train", *map(str, args), "--results", str(store)],
                            cwd=workdir, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(store.glob("runs/*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.startswith("interrupted:") and "checkpoint saved" in err, err
    (run_dir,) = store.glob("runs/*")
    assert not (run_dir / "summary.json").exists()
    step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert 8 <= step < 160
    resumed = emq("train", *args, "--results", store, "--resume", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "runs" / run_dir.name / "model.pt", weights_only=True)
    b = torch.load(run_dir / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- damaged runs and files (issue 9, item 4) ----------------------------------------------------
# Every case ends with exit status 2 and one "error:" line naming the damaged file, and leaves the
# folders it was given as they were: no file or folder added, none changed.
def tree_of(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert_one_error_line(proc, *fragments)
    assert "Traceback" not in proc.stderr


def model_of_another_config(run_dir: Path, path: Path) -> None:
    """Save at ``path`` the initial weights of the run's model at twice its width."""
    import torch

    from emq.config import from_dict
    from emq.nn.models import make_model

    cfg = from_dict(json.loads((run_dir / "config.json").read_text())).with_overrides({"model.width": 0.5})
    torch.save(make_model(cfg.model, cfg.quant, cfg.train.bits, 10, 1, 28).state_dict(), path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # file of the run -> what is done to it
    "model.pt truncated": ("model.pt", truncate),
    "model.pt garbage": ("model.pt", lambda p: p.write_bytes(bytes(range(256)) * 8)),
    "model.pt missing": ("model.pt", lambda p: p.unlink()),
    "model.pt of another config": ("model.pt", None),  # model_of_another_config
    "config.json not JSON": ("config.json", lambda p: p.write_text('{"train": {"epochs": 1,')),
    "config.json not UTF-8": ("config.json", lambda p: p.write_bytes(b'{"train": {"seed": "\xff\xfe"}}')),
    "evals.json not JSON": ("evals.json", lambda p: p.write_text("{'2/recal0': 0.5}")),
    "evals.json not UTF-8": ("evals.json", lambda p: p.write_bytes(b'{"2/recal0": \xff}')),
}
WHY = {"model.pt truncated": "cannot be read: truncated or not a PyTorch file",
       "model.pt garbage": "cannot be read: truncated or not a PyTorch file",
       "model.pt missing": "is missing",
       "model.pt of another config": "holds the weights of another model (size mismatch for",
       "config.json not JSON": "is damaged: not valid JSON", "config.json not UTF-8": "is damaged: not UTF-8 text",
       "evals.json not JSON": "is damaged: not valid JSON", "evals.json not UTF-8": "is damaged: not UTF-8 text"}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_eval_of_a_damaged_run_is_one_error_line_naming_the_file(case, trained, tmp_path):
    _, run_dir = trained
    damaged = tmp_path / run_dir.name
    shutil.copytree(run_dir, damaged)
    name, damage = DAMAGE[case]
    (model_of_another_config(run_dir, damaged / name) if damage is None else damage(damaged / name))
    cwd = tmp_path / "cwd"  # where the run's data root, data/, is the dataset: only the damage can fail
    cwd.mkdir()
    (cwd / "data").symlink_to(DATA_ROOT, target_is_directory=True)
    before = tree_of(tmp_path)
    proc = emq("eval", damaged, "--bits", "2,3", cwd=cwd)
    assert_clean_error(proc, f"{damaged / name} {WHY[case]}")
    assert tree_of(tmp_path) == before


INIT_FROM = {
    "truncated": (truncate, "cannot be read: truncated or not a PyTorch file"),
    "of another config": (None, "holds the weights of another model (size mismatch for"),
    "missing": (lambda p: shutil.rmtree(p.parent), "no finished run of that hash"),
}


@pytest.mark.parametrize("case", list(INIT_FROM))
def test_training_from_a_damaged_or_missing_init_from_run_leaves_no_run_folder(case, trained, workdir, tmp_path):
    _, run_dir = trained
    store = tmp_path / "store"
    source = store / "runs" / run_dir.name
    shutil.copytree(run_dir, source)
    damage, why = INIT_FROM[case]
    (model_of_another_config(run_dir, source / "model.pt") if damage is None else damage(source / "model.pt"))
    before = tree_of(tmp_path)
    proc = emq("train", *TINY, "--set", f"train.init_from={run_dir.name}", "--results", store, "--no-progress",
               cwd=workdir)
    named = f"train.init_from '{run_dir.name}'" + ("" if case == "missing" else f": {source / 'model.pt'}")
    assert_clean_error(proc, named, why)
    assert tree_of(tmp_path) == before  # no orphan results/runs/<hash>/ nor config.json


def test_a_config_file_that_is_not_utf8_is_one_error_line_naming_it(workdir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"quant:\n  norm: shared  # \xe9t\xe9\n")
    before = tree_of(tmp_path)
    proc = emq("train", config, *TINY, "--results", tmp_path / "store", "--no-progress", cwd=workdir)
    assert_clean_error(proc, f"config file '{config}' is not UTF-8 text")
    assert tree_of(tmp_path) == before


@pytest.mark.parametrize("below", ["", "sub"])
def test_data_fetch_into_a_file_is_one_error_line_naming_it(below, workdir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    before = tree_of(tmp_path)
    proc = emq("data", "fetch", "--root", afile / below if below else afile, cwd=workdir)
    assert_clean_error(proc, f"{afile} is a file, not a folder")
    assert tree_of(tmp_path) == before
