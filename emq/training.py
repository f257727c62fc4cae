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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import distributed, speed as speedups
from .config import ConfigError, RunConfig
from .data import Dataset, load_data
from .layers import set_bits
from .models import build_model
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
                  distill: str = "recursive") -> dict[int, float]:
    """Forward and backward at every bit-width, high to low; gradients accumulate in ``.grad``.

    recursive: the highest bit-width learns from labels, each lower one from the detached
    softmax of the next-higher; hard: all from labels; soft: all lower ones from the highest.
    Returns the loss per bit-width. The caller zeroes gradients and steps the optimizer.
    """
    losses, teacher, top = {}, None, None
    for b in sorted(bits, reverse=True):
        set_bits(model, b)
        logits = model(x)
        if teacher is None or distill == "hard":
            loss = F.cross_entropy(logits, y)
        else:
            loss = soft_cross_entropy(logits, teacher)
        loss.backward()
        losses[b] = loss.item()
        probs = F.softmax(logits.detach(), dim=1)
        top = probs if top is None else top
        teacher = top if distill == "soft" else probs
    return losses


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


def _checkpoint(run: Run, model, opt, state: TrainState, world: int = 1) -> None:
    save_torch(run.path / "checkpoint.pt", {"config_hash": run.config.hash(), "step": state.step,
                                            "elapsed": state.elapsed, "model": model.state_dict(),
                                            "optimizer": opt.state_dict(), "world_size": world})


def _resume(run: Run, model, opt, device, world: int = 1) -> TrainState:
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
    if ckpt.get("world_size", 1) != world:
        raise ConfigError(f"checkpoint {ckpt_path} was written by {ckpt.get('world_size', 1)} process(es), this run "
                          f"has {world}: resume with --nproc {ckpt.get('world_size', 1)} or delete it to restart")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    run.truncate_metrics(ckpt["step"])
    return TrainState(ckpt["step"], ckpt["elapsed"])


def train(cfg: RunConfig, store: ResultsStore, *, device: str = "auto", progress: bool = True,
          stop_after: int | None = None, data: Dataset | None = None) -> Run:
    """Train (or resume, or read back) the run of ``cfg`` in ``store``.

    ``stop_after`` ends the session after that many steps in total, leaving a checkpoint
    (for tests of resumption). ``data`` may pass an already loaded dataset of ``cfg.data``.
    SIGTERM or Ctrl-C save a checkpoint of the current step and raise TrainingInterrupted.
    """
    if store.is_finished(cfg):
        return store.run(cfg)
    t = cfg.train
    if t.batch_size % distributed.from_env().world:
        raise ConfigError(f"train.batch_size {t.batch_size} does not split evenly over "
                          f"{distributed.from_env().world} processes")
    par, dev = distributed.setup(device)  # one process, or this one of torchrun's (emq.distributed)
    data = data or load_data(cfg.data)  # before the run folder exists: bad data leaves no trace
    run = store.run(cfg) if par.main else Run(store.path_of(cfg), cfg)  # only rank 0 writes
    steps_per_epoch = len(data.train) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size {t.batch_size} is larger than the {len(data.train)} training images")
    total = steps_per_epoch * t.epochs
    speed = speedups.resolve_speed(t, dev)
    model = distributed.prepare_model(build_model(cfg, data, dev), par, dev)
    step_model = speedups.prepare_model(model, speed)
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                          nesterov=t.momentum > 0)
    state = _resume(run, model, opt, dev, par.world)
    every = t.checkpoint_every or steps_per_epoch
    last = total if stop_after is None else min(total, max(stop_after, state.step + 1))
    bar = tqdm(total=total, initial=state.step, desc=f"train {run.hash}", disable=not (progress and par.main), unit="step",
               dynamic_ncols=True, leave=False)
    started = time.perf_counter() - state.elapsed
    model.train()
    with _stop_requests() as requested:
        while state.step < last:
            epoch, start = divmod(state.step, steps_per_epoch)
            for x, y, _ in data.train.batches(t.batch_size, shuffle=True, augment=cfg.data.augment, seed=t.seed,
                                              epoch=epoch, start=start, device=dev, shard=par.shard):
                for group in opt.param_groups:
                    group["lr"] = learning_rate(cfg, state.step, total, steps_per_epoch)
                opt.zero_grad(set_to_none=True)
                with speedups.autocast(speed, dev):
                    losses = multibit_step(step_model, speedups.prepare_input(x, speed), y, t.bits, t.distill)
                distributed.allreduce_grads(model, par)
                opt.step()
                requested["stop"] = distributed.any_true(requested["stop"], par, dev)
                state.step += 1
                state.elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[max(t.bits)]:.3f}")
                if state.step % steps_per_epoch == 0:
                    accs = {str(b): distributed.evaluate_sharded(model, data.test, b, par, dev) for b in t.bits}
                    losses = distributed.mean_over(losses, par, dev)
                    if par.main:
                        run.append_metrics({"epoch": epoch + 1, "step": state.step, "lr": opt.param_groups[0]["lr"],
                                            "loss": {str(b): v for b, v in losses.items()}, "test_acc": accs,
                                            "elapsed_s": round(state.elapsed, 3)})
                    model.train()
                if par.main and (state.step % every == 0 or state.step == last or requested["stop"]):
                    _checkpoint(run, model, opt, state, par.world)
                if requested["stop"]:
                    bar.close()
                    raise TrainingInterrupted(f"training of run {run.hash} stopped at step {state.step}/{total}; "
                                              f"checkpoint saved: run the same command again to resume")
                if state.step == last:
                    break
    bar.close()
    if state.step < total or not par.main:  # stopped by stop_after, or not the writing process
        distributed.barrier(par)
        return run
    save_torch(run.path / "model.pt", model.state_dict())
    final = run.metrics()[-1]["test_acc"]
    passes = t.epochs * steps_per_epoch * t.batch_size
    write_json(run.path / "env.json", {**env_info(str(dev)), "processes": par.world, "speed": speed.as_dict()})
    write_json(run.path / "summary.json", {
        "acc": final, "wall_time_s": round(state.elapsed, 3), "steps": total, "train_size": len(data.train),
        "test_size": len(data.test),
        "sample_passes": {str(b): {"forward": passes, "backward": passes} for b in t.bits},
        "scoring_passes": 0,
    })
    (run.path / "checkpoint.pt").unlink(missing_ok=True)
    distributed.barrier(par)
    return run
