"""Run grids as data, and the runner that trains what a grid's store does not have yet.

A grid names the runs a chapter reads at a profile: methods x seeds x parameters, declared
once here rather than in a notebook. ``python -m emq grid NAME --profile P --jobs N`` trains
every missing run of the grid with N worker processes of one thread each (a run fine-tuned from
another waits for it), resumable: an interrupted run continues from its checkpoint, a finished
one is never recomputed. A chapter then reads the same configs back.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from emq.config import ConfigError, RunConfig, load_config
from emq.methods import method_configs
from emq.results import ResultsStore
from emq.training.loop import train


@dataclass(frozen=True)
class Cell:
    """One point of a grid: a method at some config overrides (dotted keys)."""

    method: str
    overrides: tuple[tuple[str, object], ...] = ()

    def configs(self, base: RunConfig) -> list[RunConfig]:
        """The runs of this point, pretraining stages first."""
        return method_configs(self.method, base, **dict(self.overrides))

    @property
    def label(self) -> str:
        return " ".join([self.method, *(f"{k.split('.')[-1]}={v}" for k, v in self.overrides)])


def cell(method: str, **overrides) -> Cell:
    """``cell("emq", train_epochs=16)``: keyword names are dotted keys with "_" after the section."""
    return Cell(method, tuple((k.replace("_", ".", 1), v) for k, v in overrides.items()))


# ---- the scale study (book/00_scale.ipynb) --------------------------------------------------------
# Accuracy against epochs and against training-set size, full precision alone and multi-bit
# (switchable BN, and shared BN + mean+var correction), on the cpu model, tested on all 10k images.
SCALE_METHODS = ("full_precision", "any_precision", "emq")
SCALE_EPOCHS = {"smoke": (1, 2), "cpu": (8, 16, 32)}
SCALE_SIZES = {"smoke": (256, 512), "cpu": (6144, 24576, 0)}  # 0 = all 60k images
SCALE_TEST_SIZE = {"smoke": 256, "cpu": 0}


def scale_grid(profile: str) -> list[Cell]:
    """Epochs on the profile's 6,144-image training set (every method); then full precision on
    other training-set sizes, 40 % of those images among them, and the multi-bit methods on all
    60k images for 4 epochs (about the sample-passes of 32 epochs on 6,144 images)."""
    epochs, sizes = SCALE_EPOCHS[profile], SCALE_SIZES[profile]
    test = SCALE_TEST_SIZE[profile]
    cells = [cell(m, data_train_size=sizes[0], data_test_size=test, train_epochs=e)
             for m in SCALE_METHODS for e in epochs]
    if profile == "cpu":
        middle, every = sizes[1], sizes[2]
        cells += [cell("full_precision", data_train_size=middle, data_test_size=test, train_epochs=e)
                  for e in (4, 8, 16)]
        cells += [cell("full_precision", data_train_size=every, data_test_size=test, train_epochs=e) for e in (2, 4, 8)]
        cells += [cell(m, data_train_size=every, data_test_size=test, train_epochs=4) for m in SCALE_METHODS[1:]]
        # 40 % of the 6,144 images: is the data redundant at this scale (chapter 04's question)?
        cells += [cell("full_precision", data_train_size=2458, data_test_size=test, train_epochs=e) for e in (16, 32)]
    else:
        cells += [cell(m, data_train_size=sizes[1], data_test_size=test, train_epochs=epochs[0]) for m in SCALE_METHODS]
    return cells


# ---- the GPU evidence (make gpu-evidence) ---------------------------------------------------------
# Chapter 02's headline comparison on all 60k Fashion-MNIST images with ResNet-20 (the gpu
# profile's model and data), 3 seeds, 20 epochs of batch 256, six runs at a time: a length chosen
# to fit the 10-minute budget of one H100-class GPU by estimate, not yet measured on one.
GPU_EVIDENCE_METHODS = ("switchable", "shared", "shared_mean", "shared_meanvar")


def gpu_evidence_grid(profile: str) -> list[Cell]:
    if profile != "gpu":
        raise KeyError(profile)
    return [cell(m, train_seed=s, train_epochs=20, train_batch_size=256) for m in GPU_EVIDENCE_METHODS
            for s in (0, 1, 2)]


GRIDS: dict[str, Callable[[str], list[Cell]]] = {
    "00_scale": scale_grid,
    "gpu_evidence": gpu_evidence_grid,
}


def grid_cells(name: str, profile: str) -> list[Cell]:
    if name not in GRIDS:
        raise ConfigError(f"unknown grid {name!r}: grids are {', '.join(GRIDS)}")
    try:
        return GRIDS[name](profile)
    except KeyError:
        raise ConfigError(f"grid {name!r} has no {profile!r} profile") from None


def grid_configs(name: str, profile: str, base: RunConfig | None = None) -> list[RunConfig]:
    """Every run of grid ``name`` at ``profile``, each once, pretraining stages before their users."""
    base = base or load_config(profile=profile)
    out: dict[str, RunConfig] = {}
    for c in grid_cells(name, profile):
        for cfg in c.configs(base):
            out.setdefault(cfg.hash(), cfg)
    return list(out.values())


# ---- the runner ----------------------------------------------------------------------------------
def _train_one(args) -> tuple[str, float, dict]:
    cfg, root, threads, device = args
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run = train(cfg, ResultsStore(root), device=device, progress=False)
    return run.hash, time.perf_counter() - t0, run.summary["acc"]


def run_grid(name: str, profile: str, store: ResultsStore, jobs: int = 2, threads: int = 1,
             base: RunConfig | None = None, echo: Callable[[str], None] = print, device: str = "cpu") -> list[str]:
    """Train every missing run of grid ``name`` at ``profile`` (:func:`train_all`)."""
    return train_all(grid_configs(name, profile, base), store, jobs, threads, f"grid {name} at {profile}", echo, device)


def train_all(configs: list[RunConfig], store: ResultsStore, jobs: int = 2, threads: int = 1, title: str = "runs",
              echo: Callable[[str], None] = print, device: str = "cpu") -> list[str]:
    """Train every config the store lacks with ``jobs`` processes of ``threads`` threads; one line
    per run. Runs fine-tuned from another (``train.init_from``) start once it has finished.
    Returns the hashes trained."""
    todo = [c for c in configs if not store.is_finished(c)]
    echo(f"{title}: {len(configs)} runs, {len(configs) - len(todo)} in the store, "
         f"{len(todo)} to train with {jobs} process(es) x {threads} thread(s)")
    done: list[str] = []
    total = len(todo)
    with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        while todo:
            ready = [c for c in todo if not c.train.init_from or store.is_finished_hash(c.train.init_from)]
            if not ready:
                raise ConfigError(f"{title}: runs wait for init_from runs that are not trained here")
            todo = [c for c in todo if c not in ready]
            for h, seconds, acc in pool.imap_unordered(_train_one, [(c, store.root, threads, device) for c in ready]):
                done.append(h)
                accs = ", ".join(f"{b}-bit {100 * a:.1f}%" for b, a in sorted(acc.items(), key=lambda t: int(t[0])))
                echo(f"[{len(done)}/{total}] run {h}: {seconds:.0f} s, {accs}")
    return done
