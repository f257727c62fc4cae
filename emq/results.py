"""The results store: one folder per run, keyed by the hash of its config.

    <root>/runs/<hash>/config.json    the RunConfig, as a dict
                       metrics.jsonl  one line per epoch (and per evaluation)
                       summary.json   accuracy per bit-width, wall time, sample-passes
                       env.json       git commit, versions, device
                       checkpoint.pt  the latest training state (while unfinished)
                       model.pt       the final weights
                       evals.json     cached evaluations, keyed by "<bits>/recal<N>"

A run with a summary is finished and is read back, never recomputed. Every file is written
atomically (a temporary file renamed into place), so an interrupted write loses nothing.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, RunConfig, from_dict


def write_atomic(path: Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def save_torch(path: Path, obj) -> None:
    """torch.save, atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def env_info(device: str) -> dict:
    """Where a run was computed: git commit, library versions, device, threads."""
    def git(*args):
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                 cwd=Path(__file__).resolve().parent)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    import torchvision

    dev = device
    if str(device).startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name()})"
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--", ".")),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": dev, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "platform": platform.platform()}


@dataclass
class Run:
    """A run of the store: its folder and config, with readers for what it wrote."""

    path: Path
    config: RunConfig

    @property
    def hash(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").is_file()

    @property
    def summary(self) -> dict:
        return read_json(self.path / "summary.json")

    @property
    def env(self) -> dict:
        return read_json(self.path / "env.json")

    def metrics(self) -> list[dict]:
        f = self.path / "metrics.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []

    def append_metrics(self, row: dict) -> None:
        f = self.path / "metrics.jsonl"
        old = f.read_text() if f.is_file() else ""
        write_atomic(f, old + json.dumps(row, sort_keys=True) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop metric rows logged after ``step`` (used when resuming from a checkpoint)."""
        rows = [r for r in self.metrics() if r.get("step", 0) <= step]
        write_atomic(self.path / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def evals(self) -> dict:
        f = self.path / "evals.json"
        return read_json(f) if f.is_file() else {}

    def save_eval(self, key: str, value) -> None:
        evals = self.evals()
        evals[key] = value
        write_json(self.path / "evals.json", evals)


class ResultsStore:
    """Runs under ``root/runs``, one folder per config hash."""

    def __init__(self, root: str | Path = "results"):
        self.root = Path(root)

    def path_of(self, cfg: RunConfig) -> Path:
        """The folder of the run of ``cfg`` (which may not exist yet)."""
        return self.root / "runs" / cfg.hash()

    def is_finished(self, cfg: RunConfig) -> bool:
        """Whether the run of ``cfg`` has finished (without creating its folder)."""
        return (self.path_of(cfg) / "summary.json").is_file()

    def run(self, cfg: RunConfig) -> Run:
        """The run of ``cfg`` (created, with its config.json, if new)."""
        path = self.path_of(cfg)
        if (path / "config.json").is_file():
            stored = from_dict(read_json(path / "config.json"))  # fields added since get their defaults
            if stored != cfg:
                raise ConfigError(f"run folder {path} holds another config (hash collision or edited file)")
        else:
            write_json(path / "config.json", cfg.to_dict())
        return Run(path, cfg)

    def open(self, path: str | Path) -> Run:
        """Open an existing run folder by path."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{str(path)!r} is not a run folder (no config.json)")
        return Run(path, from_dict(read_json(path / "config.json")))

    def runs(self, finished: bool = True) -> list[Run]:
        base = self.root / "runs"
        found = [self.open(p) for p in sorted(base.iterdir()) if (p / "config.json").is_file()] if base.is_dir() else []
        return [r for r in found if r.finished or not finished]


def write_chapter_numbers(root: str | Path, chapter: str, numbers: dict) -> Path:
    """Write a chapter's headline numbers as a flat JSON object ``root/chapters/<chapter>.json``."""
    flat = {}
    for k, v in numbers.items():
        if not isinstance(k, str) or isinstance(v, (dict, list)):
            raise ValueError(f"chapter numbers must be flat name -> number, got {k!r}: {v!r}")
        flat[k] = v if isinstance(v, (str, bool)) or v is None else float(v)
    path = Path(root) / "chapters" / f"{chapter}.json"
    write_json(path, flat)
    return path
