"""Multi-bit training (METHOD.md §1): one optimizer step per batch over all bit-widths.

``train(cfg, store)`` runs or resumes the run of ``cfg`` and returns it; a finished run is
read back from the store. Every source of randomness is a generator seeded from the config
(model init, batch order, augmentation), so on the CPU a run is deterministic and a resumed
run ends with the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import ConfigError, RunConfig
from .data import Dataset, load_data
from .evaluation import evaluate
from .layers import set_bits
from .models import build_model
from .quantizers import FULL_PRECISION
from .recipes import Configure, active_bits, kd_loss, step_configure, steepness
from .schemes import set_steepness
from .results import ResultsStore, Run, env_info, save_torch, write_json


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda[:N]``; a one-line ValueError otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda[:N]")
    return dev


def soft_cross_entropy(logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a soft target (KL up to the teacher's entropy, a constant)."""
    return -(teacher_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def multibit_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bits: tuple[int, ...],
                  distill: str = "recursive", configure: Configure = set_bits,
                  companion: nn.Module | None = None, temperature: float = 4.0) -> dict:
    """Forward and backward at every bit-width, high to low; gradients accumulate in ``.grad``.

    recursive: the highest bit-width learns from labels, each lower one from the detached
    softmax of the next-higher; hard: all from labels; soft: all lower ones from the highest;
    joint: every bit-width from labels and the full-precision ``companion`` (``kd_loss`` at
    ``temperature``), which learns from labels and from them. ``configure(model, b)`` switches
    the model to ``b`` (the recipes of :mod:`emq.recipes` pass their own). Returns the loss per
    bit-width (and ``"companion"``). The caller zeroes gradients and steps the optimizer(s).
    """
    losses, teacher, top = {}, None, None
    fp_logits = companion(x) if companion is not None else None
    student_logits = []
    for b in sorted(bits, reverse=True):
        configure(model, b)
        logits = model(x)
        if distill == "joint":
            loss = F.cross_entropy(logits, y) + kd_loss(logits, fp_logits, temperature)
            student_logits.append(logits.detach())
        elif teacher is None or distill == "hard":
            loss = F.cross_entropy(logits, y)
        else:
            loss = soft_cross_entropy(logits, teacher)
        loss.backward()
        losses[b] = loss.item()
        probs = F.softmax(logits.detach(), dim=1)
        top = probs if top is None else top
        teacher = top if distill == "soft" else probs
    if fp_logits is not None:
        kd = torch.stack([kd_loss(fp_logits, s, temperature) for s in student_logits]).mean()
        loss = F.cross_entropy(fp_logits, y) + kd
        loss.backward()
        losses["companion"] = loss.item()
    return losses


def make_companion(cfg: RunConfig, data: Dataset, device) -> nn.Module:
    """The full-precision model of joint distillation: the same architecture, 32 bits only."""
    fp = cfg.with_overrides({"train.bits": [FULL_PRECISION], "train.distill": "hard", "quant.correction": "none",
                             "quant.weight_quantizer": "dorefa", "quant.act_quantizer": "dorefa",
                             "quant.fp_act": "relu", "quant.norm": "switchable",
                             "train.seed": cfg.train.seed + 10_000})
    return build_model(fp, data, device)


def _source_key(key: str, source: dict) -> str | None:
    """The key of ``source`` that initialises ``key``: the same name or, for one BatchNorm of a
    switchable set, the source's BN at 32 bits or its shared BN."""
    if key in source:
        return key
    if ".bns." in key:
        prefix, rest = key.split(".bns.", 1)
        name = rest.split(".", 1)[1]
        for candidate in (f"{prefix}.bns.{FULL_PRECISION}.{name}", f"{prefix}.{name}"):
            if candidate in source:
                return candidate
    return None


def init_from_run(model: nn.Module, store: ResultsStore, run_hash: str, device) -> None:
    """Start ``model`` from the weights of the finished run ``run_hash`` (e.g. a full-precision one).

    Tensors of the same name are copied, and every BatchNorm of a switchable set starts from the
    source's full-precision BN, so a full-precision run can start a multi-bit one; the rest
    (e.g. quantizer parameters the source lacks) keep their initialisation.
    """
    path = store.root / "runs" / run_hash
    if not (path / "model.pt").is_file():
        raise ConfigError(f"train.init_from {run_hash!r}: no finished run of that hash in {store.root}")
    source = torch.load(path / "model.pt", map_location=device, weights_only=True)
    state = model.state_dict()
    for key in state:
        found = _source_key(key, source)
        if found is not None:
            state[key] = source[found]
    model.load_state_dict(state)


def learning_rate(cfg: RunConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Linear warm-up for ``warmup_epochs``, then cosine from ``lr`` to 0 over the remaining steps."""
    warm = int(cfg.train.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.train.lr * (step + 1) / warm
    return 0.5 * cfg.train.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGTERM or Ctrl-C after saving a checkpoint of the current step."""


@contextlib.contextmanager
def _stop_requests():
    """SIGTERM or a first Ctrl-C ask training to stop after the current step; a second Ctrl-C
    stops at once. Outside the main thread signals cannot be caught, and nothing changes."""
    requested = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class TrainState:
    step: int = 0
    elapsed: float = 0.0  # seconds of training over all sessions of the run
    passes: dict = field(default_factory=dict)  # forward (= backward) sample-passes per bit-width


def _checkpoint(run: Run, model, opt, state: TrainState, companion=None, companion_opt=None) -> None:
    extra = {} if companion is None else {"companion": companion.state_dict(),
                                          "companion_optimizer": companion_opt.state_dict()}
    save_torch(run.path / "checkpoint.pt", {"config_hash": run.config.hash(), "step": state.step,
                                            "elapsed": state.elapsed, "passes": state.passes,
                                            "model": model.state_dict(), "optimizer": opt.state_dict(), **extra})


def _resume(run: Run, model, opt, device, companion=None, companion_opt=None) -> TrainState:
    ckpt_path = run.path / "checkpoint.pt"
    if not ckpt_path.is_file():
        return TrainState()
    try:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {ckpt_path} cannot be read ({type(e).__name__}); delete it to restart") from None
    if ckpt.get("config_hash") != run.config.hash():
        raise ConfigError(f"checkpoint {ckpt_path} belongs to config {ckpt.get('config_hash')}, "
                          f"not {run.config.hash()}; delete it to restart")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if companion is not None:
        companion.load_state_dict(ckpt["companion"])
        companion_opt.load_state_dict(ckpt["companion_optimizer"])
    run.truncate_metrics(ckpt["step"])
    return TrainState(ckpt["step"], ckpt["elapsed"], dict(ckpt.get("passes", {})))


def _sgd(model: nn.Module, t) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           nesterov=t.momentum > 0)


def train(cfg: RunConfig, store: ResultsStore, *, device: str = "auto", progress: bool = True,
          stop_after: int | None = None, data: Dataset | None = None) -> Run:
    """Train (or resume, or read back) the run of ``cfg`` in ``store``.

    ``stop_after`` ends the session after that many steps in total, leaving a checkpoint
    (for tests of resumption). ``data`` may pass an already loaded dataset of ``cfg.data``.
    SIGTERM or Ctrl-C save a checkpoint of the current step and raise TrainingInterrupted.
    """
    if store.is_finished(cfg):
        return store.run(cfg)
    dev = resolve_device(device)
    data = data or load_data(cfg.data)  # before the run folder exists: bad data leaves no trace
    run = store.run(cfg)
    t = cfg.train
    steps_per_epoch = len(data.train) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {t.batch_size} is larger than the {len(data.train)} training images")
    total = steps_per_epoch * t.epochs
    model = build_model(cfg, data, dev)
    opt = _sgd(model, t)
    companion = make_companion(cfg, data, dev) if t.distill == "joint" else None
    companion_opt = _sgd(companion, t) if companion is not None else None
    state = _resume(run, model, opt, dev, companion, companion_opt)
    if state.step == 0 and t.init_from:
        init_from_run(model, store, t.init_from, dev)
    every = t.checkpoint_every or steps_per_epoch
    last = total if stop_after is None else min(total, max(stop_after, state.step + 1))
    bar = tqdm(total=total, initial=state.step, desc=f"train {run.hash}", disable=not progress, unit="step",
               dynamic_ncols=True, leave=False)
    started = time.perf_counter() - state.elapsed
    model.train()
    with _stop_requests() as requested:
        while state.step < last:
            epoch, start = divmod(state.step, steps_per_epoch)
            for x, y, _ in data.train.batches(t.batch_size, shuffle=True, augment=cfg.data.augment, seed=t.seed,
                                              epoch=epoch, start=start, device=dev):
                optimizers = [opt] if companion is None else [opt, companion_opt]
                for o in optimizers:
                    for group in o.param_groups:
                        group["lr"] = learning_rate(cfg, state.step, total, steps_per_epoch)
                    o.zero_grad(set_to_none=True)
                bits = active_bits(t, state.step, total)
                set_steepness(model, steepness(cfg.quant, state.step, total))
                losses = multibit_step(model, x, y, bits, t.distill, step_configure(t, model, state.step, total),
                                       companion, t.kd_temperature)
                for o in optimizers:
                    o.step()
                for key in (*bits, *(["companion"] if companion is not None else [])):
                    state.passes[str(key)] = state.passes.get(str(key), 0) + len(y)
                state.step += 1
                state.elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[max(t.bits)]:.3f}")
                if state.step % steps_per_epoch == 0:
                    accs = {str(b): evaluate(model, data.test, b, device=dev) for b in t.bits}
                    run.append_metrics({"epoch": epoch + 1, "step": state.step, "lr": opt.param_groups[0]["lr"],
                                        "loss": {str(b): v for b, v in losses.items()}, "test_acc": accs,
                                        "elapsed_s": round(state.elapsed, 3)})
                    model.train()
                if state.step % every == 0 or state.step == last or requested["stop"]:
                    _checkpoint(run, model, opt, state, companion, companion_opt)
                if requested["stop"]:
                    bar.close()
                    raise TrainingInterrupted(f"training of run {run.hash} stopped at step {state.step}/{total}; "
                                              f"checkpoint saved: run the same command again to resume")
                if state.step == last:
                    break
    bar.close()
    if state.step < total:  # stopped by stop_after
        return run
    save_torch(run.path / "model.pt", model.state_dict())
    final = run.metrics()[-1]["test_acc"]
    write_json(run.path / "env.json", env_info(str(dev)))
    write_json(run.path / "summary.json", {
        "acc": final, "wall_time_s": round(state.elapsed, 3), "steps": total, "train_size": len(data.train),
        "test_size": len(data.test),
        "sample_passes": {k: {"forward": n, "backward": n} for k, n in state.passes.items()},
        "scoring_passes": 0,
    })
    (run.path / "checkpoint.pt").unlink(missing_ok=True)
    return run
