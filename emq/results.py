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

from emq.config import ConfigError, RunConfig, from_dict


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
    """A JSON file's content; a non-UTF-8 or invalid file is a one-line ConfigError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is damaged: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is damaged: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def save_torch(path: Path, obj) -> None:
    """torch.save, atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_torch(path: Path, device="cpu", fix: str = ""):
    """torch.load(weights_only=True) of a file a run wrote (model.pt, checkpoint.pt); a missing,
    truncated or foreign file is a one-line ConfigError naming it, followed by ``fix``."""
    path = Path(path)
    fix = f": {fix}" if fix else ""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing{fix}") from None
    except (PermissionError, IsADirectoryError) as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror}){fix}") from None
    except Exception as e:  # truncated: OSError, RuntimeError or EOFError; garbage: UnpicklingError, IndexError, ...
        raise ConfigError(f"{path} cannot be read: truncated or not a PyTorch file ({type(e).__name__}){fix}") from None


def load_state(model: torch.nn.Module, state, path: Path, fix: str = "") -> None:
    """``model.load_state_dict(state)`` of weights read from ``path``; weights of another model
    (another config: other shapes or names) are a one-line ConfigError naming the file and the first mismatch."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e).strip()]
        more = f"; {len(problems) - 1} more" if len(problems) > 1 else ""
        fix = f": {fix}" if fix else ""
        first = problems[0].rstrip(". ")
        raise ConfigError(f"{path} holds the weights of another model ({first}{more}){fix}") from None


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

    def check_finished(self) -> None:
        """Raise a one-line ConfigError unless the run has finished."""
        if not self.finished:
            raise ConfigError(f"run {self.path} has not finished: train it (or resume it) first")

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
        return self.is_finished_hash(cfg.hash())

    def is_finished_hash(self, run_hash: str) -> bool:
        """Whether the run of that hash has finished."""
        return (self.root / "runs" / run_hash / "summary.json").is_file()

    def run(self, cfg: RunConfig) -> Run:
        """The run of ``cfg`` (created, with its config.json, if new)."""
        path = self.path_of(cfg)
        if (path / "config.json").is_file():
            stored = from_dict(read_json(path / "config.json"))  # fields added since get their defaults
            if stored.portable() != cfg.portable():
                raise ConfigError(f"run folder {path} holds another config (hash collision or edited file)")
        else:
            write_json(path / "config.json", cfg.portable().to_dict())
        return Run(path, cfg)

    def open(self, path: str | Path) -> Run:
        """Open an existing run folder by path."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{str(path)!r} is not a run folder (no config.json)")
        d = read_json(path / "config.json")
        try:
            return Run(path, from_dict(d))
        except ConfigError as e:
            raise ConfigError(f"{path / 'config.json'}: {e}") from None

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


def rehash_store(root: str | Path = "results") -> dict[str, str]:
    """Rename the run folders of a store made before run hashes left out the data root.

    Each folder whose name is not the hash of its config is renamed to that hash and its
    config.json rewritten without the data root; a run fine-tuned from another (``train.init_from``)
    gets the new hash of that run first, which changes its own. Nothing is retrained and no other
    file is touched. Returns ``{old hash: new hash}`` of the renamed runs.
    """
    base = Path(root) / "runs"
    configs = {p.name: from_dict(read_json(p / "config.json")) for p in sorted(base.iterdir())
               if (p / "config.json").is_file()}
    renamed: dict[str, str] = {}

    def new_hash(old: str) -> str:
        if old not in renamed:
            cfg = configs[old].portable()
            source = cfg.train.init_from
            if source in configs:
                cfg = cfg.with_overrides({"train.init_from": new_hash(source)})
            configs[old] = cfg
            renamed[old] = cfg.hash()
        return renamed[old]

    for old in list(configs):
        new = new_hash(old)
        if new != old and (base / new).exists():
            raise ConfigError(f"cannot rename run {old} to {new}: {base / new} exists")
    for old, new in renamed.items():
        write_json(base / old / "config.json", configs[old].to_dict())
        if new != old:
            os.replace(base / old, base / new)
    return {old: new for old, new in renamed.items() if new != old}
