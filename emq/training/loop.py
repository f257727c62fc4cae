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

from emq.config import ConfigError, RunConfig
from emq.data.datasets import Dataset
from emq.data.load import load_data
from emq.nn.layers import set_bits
from emq.nn.models import build_model
from emq.quant.quantizers import FULL_PRECISION
from emq.quant.schemes import advance_schedules
from emq.results import ResultsStore, Run, env_info, load_state, load_torch, save_torch, write_json
from emq.training import distributed
from emq.training import speed as speedups
from emq.training.coresets import (
    LightweightScores,
    bitwise_batches,
    is_active,
    make_schedule,
    select_subsets,
    selects_at,
)
from emq.training.recipes import Configure, active_bits, kd_loss, step_configure


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
    the model to ``b`` (the recipes of :mod:`emq.training.recipes` pass their own). Returns the loss per
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


def bitwise_step(model: nn.Module, batches: dict[int, tuple], distill: str = "recursive",
                 on_logits=None, configure: Configure = set_bits) -> tuple[dict[int, float], dict[int, int]]:
    """:func:`multibit_step` when each bit-width has its own batch ``bits -> (x, y, index)``.

    Distillation keeps METHOD.md §1's teachers: where a child's batch is not its teacher's,
    the teacher (next-higher bit-width, or the highest for ``soft``) runs one extra forward
    pass on the child's batch, without gradient, in training mode; those passes are returned
    per child bit-width so that the cost accounts for them. With one shared batch this is
    exactly :func:`multibit_step`. ``on_logits(bits, index, logits, y)`` sees each child's
    detached logits (for lightweight scores); ``configure`` switches the model as in
    :func:`multibit_step`.
    """
    order = sorted(batches, reverse=True)
    losses, probs, extra = {}, {}, {b: 0 for b in order}
    for i, b in enumerate(order):
        x, y, index = batches[b]
        teacher = None
        if i > 0 and distill != "hard":
            t = order[i - 1] if distill == "recursive" else order[0]
            if batches[t][2] is index:
                teacher = probs[t]
            else:
                with torch.no_grad():
                    configure(model, t)
                    teacher = F.softmax(model(x), dim=1)
                extra[b] += len(x)
        configure(model, b)
        logits = model(x)
        loss = F.cross_entropy(logits, y) if teacher is None else soft_cross_entropy(logits, teacher)
        loss.backward()
        losses[b] = loss.item()
        probs[b] = F.softmax(logits.detach(), dim=1)
        if on_logits is not None:
            on_logits(b, index, logits.detach(), y)
    return losses, extra


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
    try:
        source = load_torch(path / "model.pt", device)
        if not isinstance(source, dict):
            raise ConfigError(f"{path / 'model.pt'} holds a {type(source).__name__}, not a model's weights")
        state = model.state_dict()
        for key in state:
            found = _source_key(key, source)
            if found is not None:
                state[key] = source[found]
        load_state(model, state, path / "model.pt")
    except ConfigError as e:
        raise ConfigError(f"train.init_from {run_hash!r}: {e}") from None


def learning_rate(cfg: RunConfig, step: int, total: int, steps_per_epoch: int, epoch: int | None = None) -> float:
    """Linear warm-up for ``warmup_epochs``, then the schedule: cosine from ``lr`` to 0 over the
    remaining steps, or step: ``lr * gamma^k`` from the start of the ``epoch`` (default
    ``step // steps_per_epoch``) at which ``k`` milestones have passed; a milestone ``f`` is the
    start of epoch ``ceil(f * epochs)`` (0-based), as PyTorch's MultiStepLR stepped once per epoch."""
    t = cfg.train
    warm = int(t.warmup_epochs * steps_per_epoch)
    if step < warm:
        return t.lr * (step + 1) / warm
    if t.schedule == "step":
        epoch = step // steps_per_epoch if epoch is None else epoch
        # rounded first, so that 0.7 * 10 = 7.000000000000001 is epoch 7, not 8
        return t.lr * t.gamma ** sum(epoch >= math.ceil(round(f * t.epochs, 9)) for f in t.milestones)
    return 0.5 * t.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


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
    eval_time: float = 0.0  # of which seconds spent on the per-epoch test evaluations
    coreset: dict | None = None  # subsets, their epoch, lightweight scores and cost counters


def _checkpoint(run: Run, model, opt, state: TrainState, world: int = 1, companion=None,
                companion_opt=None) -> None:
    ckpt = {"config_hash": run.config.hash(), "step": state.step, "elapsed": state.elapsed,
            "eval_time": state.eval_time, "passes": state.passes, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "world_size": world}
    if companion is not None:
        ckpt.update(companion=companion.state_dict(), companion_optimizer=companion_opt.state_dict())
    if state.coreset is not None:
        ckpt["coreset"] = state.coreset
    save_torch(run.path / "checkpoint.pt", ckpt)


def _resume(run: Run, model, opt, device, world: int = 1, companion=None, companion_opt=None) -> TrainState:
    ckpt_path = run.path / "checkpoint.pt"
    if not ckpt_path.is_file():
        return TrainState()
    ckpt = load_torch(ckpt_path, device, "delete it to restart")
    if ckpt.get("config_hash") != run.config.hash():
        raise ConfigError(f"checkpoint {ckpt_path} belongs to config {ckpt.get('config_hash')}, "
                          f"not {run.config.hash()}; delete it to restart")
    if ckpt.get("world_size", 1) != world:
        raise ConfigError(f"checkpoint {ckpt_path} was written by {ckpt.get('world_size', 1)} process(es), this run "
                          f"has {world}: resume with --nproc {ckpt.get('world_size', 1)} or delete it to restart")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if companion is not None:
        companion.load_state_dict(ckpt["companion"])
        companion_opt.load_state_dict(ckpt["companion_optimizer"])
    run.truncate_metrics(ckpt["step"])
    return TrainState(ckpt["step"], ckpt["elapsed"], dict(ckpt.get("passes", {})), ckpt.get("eval_time", 0.0),
                      ckpt.get("coreset"))


def _new_coreset_state(cfg: RunConfig) -> dict:
    bits = [str(b) for b in cfg.train.bits]
    return {"subsets": None, "epoch": -1, "selections": 0, "light": None, "scoring_time_s": 0.0,
            "teacher_forward": dict.fromkeys(bits, 0), "scoring": {b: {"forward": 0, "backward": 0} for b in bits}}


def _select(cfg: RunConfig, model, data: Dataset, epoch: int, cs: dict, light, dev) -> None:
    """Re-select every bit-width's subset at the start of ``epoch``, counting the scoring cost."""
    t0 = time.perf_counter()
    subsets, passes = select_subsets(model, data.train, cfg, epoch, light, dev)
    cs["subsets"] = {str(b): v for b, v in subsets.items()}
    cs["epoch"], cs["selections"] = epoch, cs["selections"] + 1
    for b, p in passes.items():
        cs["scoring"][str(b)]["forward"] += p.forward
        cs["scoring"][str(b)]["backward"] += p.backward
    cs["scoring_time_s"] += time.perf_counter() - t0
    model.train()


def _lightweight_recorder(light, cs: dict):
    """``on_logits`` for :func:`bitwise_step`: update the scores, timing what it costs."""
    def record(b, index, logits, y):
        t0 = time.perf_counter()
        light.update(b, index, logits, y)
        cs["scoring_time_s"] += time.perf_counter() - t0
    return record


def make_optimizer(model: nn.Module, t) -> torch.optim.Optimizer:
    """``train.optimizer``: SGD (Nesterov when there is momentum) or Adam; weight decay is L2 in both."""
    if t.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           nesterov=t.momentum > 0)


def train(cfg: RunConfig, store: ResultsStore, *, device: str = "auto", progress: bool = True,
          stop_after: int | None = None, data: Dataset | None = None) -> Run:
    """Train (or resume, or read back) the run of ``cfg`` in ``store``.

    ``stop_after`` ends the session after that many steps in total, leaving a checkpoint
    (for tests of resumption). ``data`` may pass an already loaded dataset of ``cfg.data``.
    SIGTERM or Ctrl-C save a checkpoint of the current step and raise TrainingInterrupted.

    With ``coreset.prune > 0`` every bit-width trains on its own subset after the warm-up
    epochs (:mod:`emq.training.coresets`); one step still takes one batch per bit-width. The recipes of
    :mod:`emq.training.recipes` decide at every step which bit-widths train and how the model switches.
    """
    if store.is_finished(cfg):
        return store.run(cfg)
    t = cfg.train
    world = distributed.from_env().world
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size {t.batch_size} does not split evenly over {world} processes")
    if world > 1 and (is_active(cfg) or t.distill == "joint"):
        raise ConfigError("coreset pruning and joint distillation train on one process only; leave out --nproc")
    par, dev = distributed.setup(device)  # one process, or this one of torchrun's (emq.training.distributed)
    data = data or load_data(cfg.data)  # before the run folder exists: bad data leaves no trace
    plan, subset_size = make_schedule(cfg, data.train.y)  # a too small subset leaves no trace either
    steps_per_epoch, total, pruning = plan.full_steps, plan.total, is_active(cfg)
    speed = speedups.resolve_speed(t, dev)
    model = distributed.prepare_model(build_model(cfg, data, dev), par, dev)
    step_model = speedups.prepare_model(distributed.wrap(model, par, dev), speed)  # the forward passes
    opt = make_optimizer(model, t)
    companion = make_companion(cfg, data, dev) if t.distill == "joint" else None
    companion_opt = make_optimizer(companion, t) if companion is not None else None
    if t.init_from and not (store.path_of(cfg) / "checkpoint.pt").is_file():  # else resumed from the checkpoint
        init_from_run(model, store, t.init_from, dev)  # before the run folder exists: a bad source leaves no trace
    run = store.run(cfg) if par.main else Run(store.path_of(cfg), cfg)  # only rank 0 writes
    state = _resume(run, model, opt, dev, par.world, companion, companion_opt)
    if pruning and state.coreset is None:
        state.coreset = _new_coreset_state(cfg)
    cs = state.coreset
    light, record = None, None
    if pruning and cfg.coreset.mode == "lightweight":
        light = LightweightScores(len(data.train), t.bits, cfg.coreset.score,
                                  {int(b): v for b, v in cs["light"].items()} if cs["light"] else None)
        cs["light"] = {str(b): v for b, v in light.values.items()}  # the same tensors, updated in place
        record = _lightweight_recorder(light, cs)
    optimizers = [opt] if companion is None else [opt, companion_opt]
    last = total if stop_after is None else min(total, max(stop_after, state.step + 1))
    bar = tqdm(total=total, initial=state.step, desc=f"train {run.hash}", disable=not (progress and par.main),
               unit="step", dynamic_ncols=True, leave=False)
    started = time.perf_counter() - state.elapsed
    model.train()
    with _stop_requests() as requested:
        while state.step < last:
            epoch, start = plan.locate(state.step)
            if not pruning:
                steps = data.train.batches(t.batch_size, shuffle=True, augment=cfg.data.augment, seed=t.seed,
                                           epoch=epoch, start=start, device=dev, shard=par.shard)
            elif epoch < cfg.coreset.warmup_epochs:  # all children share the full-data batch
                steps = ({b: batch for b in t.bits} for batch in data.train.batches(
                    t.batch_size, shuffle=True, augment=cfg.data.augment, seed=t.seed, epoch=epoch, start=start,
                    device=dev))
            else:
                if selects_at(cfg, epoch) and cs["epoch"] != epoch:
                    _select(cfg, model, data, epoch, cs, light, dev)
                steps = bitwise_batches(data.train, {int(b): v for b, v in cs["subsets"].items()}, t.batch_size,
                                        seed=t.seed, epoch=epoch, start=start, augment=cfg.data.augment, device=dev)
            for batch in steps:
                for o in optimizers:
                    for group in o.param_groups:
                        group["lr"] = learning_rate(cfg, state.step, total, steps_per_epoch, epoch)
                    o.zero_grad(set_to_none=True)
                bits = active_bits(t, state.step, total)
                advance_schedules(model, state.step, total)  # e.g. shift-bit's steepness
                configure = step_configure(t, model, state.step, total)
                with speedups.autocast(speed, dev):
                    if pruning:
                        batch = {b: batch[b] for b in bits}
                        losses, extra = bitwise_step(step_model, batch, t.distill, record, configure)
                        for b, n in extra.items():
                            cs["teacher_forward"][str(b)] += n
                        sizes = {b: len(batch[b][1]) for b in bits}
                    else:
                        x, y, _ = batch
                        losses = multibit_step(step_model, speedups.prepare_input(x, speed), y, bits, t.distill,
                                               configure, companion, t.kd_temperature)
                        sizes = {b: len(y) * par.world for b in (*bits, *(["companion"] if companion else []))}
                for o in optimizers:
                    o.step()
                requested["stop"] = distributed.any_true(requested["stop"], par, dev)
                for key, n in sizes.items():
                    state.passes[str(key)] = state.passes.get(str(key), 0) + n
                state.step += 1
                state.elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[max(t.bits)]:.3f}")
                epoch_end = plan.locate(state.step)[1] == 0
                if epoch_end:
                    t_eval = time.perf_counter()
                    accs = {str(b): distributed.evaluate_sharded(model, data.test, b, par, dev) for b in t.bits}
                    losses = distributed.mean_over(losses, par, dev)
                    row = {"epoch": epoch + 1, "step": state.step, "lr": opt.param_groups[0]["lr"],
                           "loss": {str(b): v for b, v in losses.items()}, "test_acc": accs,
                           "elapsed_s": round(state.elapsed, 3)}
                    if pruning:
                        row["subset_size"] = subset_size if epoch >= cfg.coreset.warmup_epochs else len(data.train)
                    if par.main:
                        run.append_metrics(row)
                    model.train()
                    state.eval_time += time.perf_counter() - t_eval
                saving = state.step % t.checkpoint_every == 0 if t.checkpoint_every else epoch_end
                if par.main and (saving or state.step == last or requested["stop"]):
                    _checkpoint(run, model, opt, state, par.world, companion, companion_opt)
                if requested["stop"]:
                    bar.close()
                    raise TrainingInterrupted(f"training of run {run.hash} stopped at step {state.step}/{total}; "
                                              f"checkpoint saved: run the same command again to resume")
                if state.step == last or epoch_end:
                    break
    bar.close()
    if state.step < total or not par.main:  # stopped by stop_after, or not the writing process
        distributed.barrier(par)
        return run
    save_torch(run.path / "model.pt", model.state_dict())
    if cs is not None:  # the last subset of every bit-width, for analyses of what was kept
        save_torch(run.path / "subsets.pt", cs["subsets"])
    metrics = run.metrics()
    final = metrics[-1]["test_acc"]
    write_json(run.path / "env.json", {**env_info(str(dev)), "processes": par.world, "speed": speed.as_dict()})
    write_json(run.path / "summary.json", {
        "acc": final, "wall_time_s": round(state.elapsed, 3), "eval_time_s": round(state.eval_time, 3),
        "steps": total, "train_size": len(data.train), "test_size": len(data.test),
        **_cost(plan, cs, subset_size, state.passes), **best_epoch(metrics),
    })
    (run.path / "checkpoint.pt").unlink(missing_ok=True)
    distributed.barrier(par)
    return run


def best_epoch(metrics: list[dict]) -> dict:
    """The epoch of the highest test accuracy at the highest trained bit-width (32: full precision),
    the first of ties, and every bit-width's accuracy at it.

    Choosing the epoch on the test set is upstream's practice (Any-Precision's train.py keeps
    its ``model_best`` by 32-bit test accuracy), not ours: ``acc`` stays the last epoch's, and
    the book reports these fields only beside it, never instead of it.
    """
    top = str(max(int(b) for b in metrics[-1]["test_acc"]))
    best = max(metrics, key=lambda row: (row["test_acc"][top], -row["epoch"]))
    return {"best_epoch": best["epoch"], "acc_at_best_epoch": best["test_acc"]}


def _cost(plan, cs: dict | None, subset_size: int, passes: dict) -> dict:
    """Sample-passes per bit-width (forward, backward, and teacher passes of bit-wise runs) and scoring."""
    if cs is None:
        return {"sample_passes": {k: {"forward": n, "backward": n} for k, n in passes.items()}, "scoring_passes": 0}
    return {
        "sample_passes": {k: {"forward": n, "backward": n, "teacher_forward": cs["teacher_forward"][k]}
                          for k, n in passes.items()},
        "scoring_passes": sum(p["forward"] + p["backward"] for p in cs["scoring"].values()),
        "scoring_passes_by_bits": cs["scoring"], "scoring_time_s": round(cs["scoring_time_s"], 4),
        "coreset": {"subset_size": subset_size, "selections": cs["selections"],
                    "full_data_steps": plan.warmup * plan.full_steps,
                    "subset_steps": plan.total - plan.warmup * plan.full_steps},
    }
