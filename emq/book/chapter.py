"""What the chapters share: locating the repository, the results store of a profile, and
recording the headline numbers that are glued into the prose.

A chapter makes one :class:`Chapter` from its papermill parameters; the training and the
analysis it calls live in the other modules of the package.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from emq.book.grids import Cell, grid_of, grid_stages
from emq.config import DataConfig, RunConfig, load_config
from emq.data.datasets import Dataset
from emq.data.load import load_data
from emq.methods import method_configs
from emq.profiles import RECALIBRATION_BATCHES
from emq.results import ResultsStore, Run, write_chapter_numbers, write_json
from emq.training.coresets import total_passes, training_time
from emq.training.loop import train


def repo_root(start: str | Path | None = None) -> Path:
    """The repository's top folder: the first parent of ``start`` (or the cwd) holding ``_toc.yml``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() and (folder / "emq").is_dir():
            return folder
    raise FileNotFoundError(f"no emq repository (a folder with _toc.yml and emq/) above {here}")


class Chapter:
    """A chapter's runs and numbers at one profile.

    ``results_dir`` and ``data_root`` are relative to the repository root unless absolute.
    """

    def __init__(self, name: str, profile: str = "cpu", results_dir: str = "results", data_root: str = "data",
                 device: str = "auto"):
        root = repo_root()
        self.name, self.profile, self.device = name, profile, device
        self.store = ResultsStore(root / results_dir)
        self.base = load_config(profile=profile, overrides={"data.root": str(root / data_root)})
        self.recalibration_batches = RECALIBRATION_BATCHES[profile]
        self.numbers: dict[str, float] = {}
        self.asked: dict[str, dict] = {}  # hash -> non-default config of every run the chapter read
        self._data: dict[DataConfig, Dataset] = {}

    def data(self, cfg: RunConfig | None = None) -> Dataset:
        """The dataset of ``cfg`` (default: the profile's), loaded once per chapter."""
        dcfg = (cfg or self.base).data
        if dcfg not in self._data:
            self._data[dcfg] = load_data(dcfg)
        return self._data[dcfg]

    def run(self, cfg: RunConfig) -> Run:
        """Train ``cfg`` unless the store has it; prints one line either way."""
        if self.store.is_finished(cfg):
            run = self.store.run(cfg)
            print(f"run {run.hash}: read from the store")
            return self.keep(run)
        t0 = time.perf_counter()
        run = train(cfg, self.store, device=self.device, progress=False, data=self.data(cfg))
        print(f"run {run.hash}: trained in {time.perf_counter() - t0:.0f} s")
        return self.keep(run)

    def grid(self, name: str, train_missing: bool = True, group: str | None = None) -> list[tuple[Cell, Run | None]]:
        """Every point of grid ``name`` (:mod:`emq.book.grids`) at the chapter's profile, or of one
        ``group`` of it, with its run (the last stage of its method): read from the store, or trained
        first when missing and ``train_missing``; None when missing otherwise (``python -m emq grid``
        trains it)."""
        out = []
        for c, stages in grid_stages(name, self.profile, self.base, group):
            if train_missing or all(self.store.is_finished(s) for s in stages):
                out.append((c, [self.run(s) for s in stages][-1]))
            else:
                out.append((c, None))
        return out

    def runs(self, name: str, extended: bool = False) -> GridRuns:
        """The runs of grid ``name`` at the chapter's profile, by group and key as the grid declares
        them (each the last stage of its method), read from the store or trained first when missing.
        A cell of the grid's extended tier is trained only if ``extended``; otherwise it is read when
        the store has every stage of it and left out (listed in ``missing``) when not."""
        grid = grid_of(name, self.profile)
        base = grid.base(self.base)
        groups: dict[str, dict] = {}
        stages: dict[str, list[Run]] = {}
        missing: dict[str, list] = {}
        for group, cells in grid.groups.items():
            groups[group] = {}
            for key, c in cells.items():
                configs = c.configs(base)
                if not extended and grid.is_extended(group, key) and not all(map(self.store.is_finished, configs)):
                    missing.setdefault(group, []).append(key)
                    continue
                runs = [self.run(cfg) for cfg in configs]
                groups[group][key] = runs[-1]
                stages[runs[-1].hash] = runs
        if missing:
            left = "; ".join(f"{group} " + ", ".join(map(str, keys)) for group, keys in missing.items())
            print(f"left out, not in the store: the extended tier's {left} "
                  f"(python -m emq grid {name} --profile {self.profile} --extended trains them)")
        return GridRuns(base, groups, stages, missing)

    def keep(self, run: Run) -> Run:
        """Note that the chapter read ``run`` (listed in ``results/chapters/<chapter>.runs.json``)."""
        self.asked[run.hash] = run.config.portable().non_default()
        return run

    def run_method(self, name: str, base: RunConfig | None = None, **overrides) -> list[Run]:
        """Train (or read) every run of method ``name``: its pretraining stage first, if any."""
        return [self.run(cfg) for cfg in method_configs(name, base or self.base, **overrides)]

    def record(self, name: str, value: float) -> None:
        """Keep a headline number for the chapter's JSON (``results/chapters/<chapter>.json``)."""
        self.numbers[name] = float(value)

    def glue(self, name: str, value: float) -> None:
        """Glue ``value`` for the prose (``{glue:text}`name` ``) and record it for the JSON."""
        from myst_nb import glue

        self.record(name, value)
        glue(name, float(value), display=False)

    def save_numbers(self) -> None:
        """Write the chapter's JSON and say where, relative to the repository (no machine path)."""
        path = write_chapter_numbers(self.store.root, self.name, self.numbers)
        write_json(path.with_suffix(".runs.json"), self.asked)
        root = repo_root()
        shown = path.relative_to(root) if path.is_relative_to(root) else Path(path.parent.name, path.name)
        print(f"wrote {len(self.numbers)} numbers to {shown}")


@dataclass(frozen=True)
class GridRuns:
    """A chapter's runs: ``runs["methods"][("switchable", 0)]`` is the run of that group and key."""

    base: RunConfig  # the config the grid's runs start from, with this machine's data root
    groups: dict[str, dict]  # group -> key -> Run (the last stage of its method)
    stages: dict[str, list[Run]]  # hash of a last stage -> every stage of its method, pretraining first
    missing: dict[str, list] = field(default_factory=dict)  # group -> keys of its extended cells not in the store

    def __getitem__(self, group: str) -> dict:
        return self.groups[group]

    def every_run(self, runs=None) -> list[Run]:
        """Every stage of ``runs`` (default: of the whole grid), pretraining stages included."""
        last = runs if runs is not None else [r for g in self.groups.values() for r in g.values()]
        return [stage for r in last for stage in self.stages[r.hash]]


def training_cost(runs: list[Run]) -> dict[str, float]:
    """What a method's runs cost together: training time (wall time less the per-epoch test
    evaluations) and sample-passes (:func:`emq.training.coresets.total_passes`: forward, backward,
    teacher and scoring passes of one sample at one bit-width, or through a companion)."""
    return {"train_time_s": sum(training_time(r.summary) for r in runs),
            "sample_passes": sum(total_passes(r.summary) for r in runs)}
