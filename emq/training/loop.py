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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from emq.config import ConfigError, RunConfig, register
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
    Passes,
    Schedule,
    bitwise_batches,
    is_active,
    make_schedule,
    select_subsets,
    selects_at,
)
from emq.training.distill import kd_loss, soft_cross_entropy
from emq.training.recipes import Configure, active_bits, step_configure


def shared_batch(x: torch.Tensor, y: torch.Tensor, bits: tuple[int, ...], index=None) -> dict[int, tuple]:
    """One batch that every bit-width of ``bits`` trains on, in the form :func:`train_step` takes."""
    return {b: (x, y, index) for b in bits}


def _teacher(model: nn.Module, batches: dict[int, tuple], order: list[int], i: int, probs: dict, distill: str,
             configure: Configure) -> tuple[torch.Tensor | None, int]:
    """The soft target of the ``i``-th bit-width of ``order`` and the extra sample-passes it took.

    recursive: the next-higher bit-width's detached softmax; soft: the highest's; hard and joint:
    none. Where the child's batch is not its teacher's, the teacher runs one extra forward pass
    on the child's batch, without gradient, in training mode."""
    if i == 0 or distill in ("hard", "joint"):
        return None, 0
    t = order[i - 1] if distill == "recursive" else order[0]
    x, _, index = batches[order[i]]
    if batches[t][2] is index:
        return probs[t], 0
    with torch.no_grad():
        configure(model, t)
        return F.softmax(model(x), dim=1), len(x)


def train_step(model: nn.Module, batches: dict[int, tuple], distill: str = "recursive",
               configure: Configure = set_bits, companion: nn.Module | None = None, temperature: float = 4.0,
               on_logits=None) -> tuple[dict, dict[int, int]]:
    """Forward and backward at every bit-width, high to low; gradients accumulate in ``.grad``.

    ``batches`` maps each bit-width to its batch ``(x, y, index)``: one shared batch
    (:func:`shared_batch`), or each bit-width's own (bit-wise coresets). recursive: the highest
    bit-width learns from labels, each lower one from the detached softmax of the next-higher;
    hard: all from labels; soft: all lower ones from the highest; joint: every bit-width from
    labels and the full-precision ``companion`` (``kd_loss`` at ``temperature``), which learns from
    labels and from them. ``configure(model, b)`` switches the model to ``b`` (the recipes of
    :mod:`emq.training.recipes` pass their own); ``on_logits(bits, index, logits, y)`` sees each
    bit-width's detached logits (lightweight scores). Returns the loss per bit-width (and
    ``"companion"``) and the teachers' extra sample-passes per bit-width. The caller zeroes
    gradients and steps the optimizer(s).
    """
    order = sorted(batches, reverse=True)
    losses, probs, extra, student_logits = {}, {}, dict.fromkeys(order, 0), []
    fp_logits = companion(batches[order[0]][0]) if companion is not None else None
    for i, b in enumerate(order):
        x, y, index = batches[b]
        teacher, extra[b] = _teacher(model, batches, order, i, probs, distill, configure)
        configure(model, b)
        logits = model(x)
        if distill == "joint":
            loss = F.cross_entropy(logits, y) + kd_loss(logits, fp_logits, temperature)
            student_logits.append(logits.detach())
        elif teacher is None:
            loss = F.cross_entropy(logits, y)
        else:
            loss = soft_cross_entropy(logits, teacher)
        loss.backward()
        losses[b] = loss.item()
        probs[b] = F.softmax(logits.detach(), dim=1)
        if on_logits is not None:
            on_logits(b, index, logits.detach(), y)
    if fp_logits is not None:
        x, y, _ = batches[order[0]]
        kd = torch.stack([kd_loss(fp_logits, s, temperature) for s in student_logits]).mean()
        loss = F.cross_entropy(fp_logits, y) + kd
        loss.backward()
        losses["companion"] = loss.item()
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


# train.schedule: the schedules of learning_rate after the warm-up
SCHEDULES = ("cosine", "step")
register("train.schedule", SCHEDULES)


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
class CoresetState:
    """Where bit-wise coreset training stands: each bit-width's subset and the epoch it was selected
    at, the lightweight scores, and what scoring cost. A checkpoint holds it as :meth:`as_dict`."""

    subsets: dict[int, torch.Tensor] | None = None
    epoch: int = -1  # of the last selection
    selections: int = 0
    light: dict[int, torch.Tensor] | None = None  # lightweight scores per bit-width (LightweightScores.values)
    scoring_time_s: float = 0.0
    teacher_forward: dict[int, int] = field(default_factory=dict)  # extra teacher sample-passes
    scoring: dict[int, Passes] = field(default_factory=dict)

    @classmethod
    def new(cls, bits: tuple[int, ...]) -> CoresetState:
        return cls(teacher_forward=dict.fromkeys(bits, 0), scoring={b: Passes() for b in bits})

    def as_dict(self) -> dict:
        """The checkpoint's form: plain dicts keyed by the bit-width as a string."""
        def by_str(d):
            return None if d is None else {str(b): v for b, v in d.items()}
        return {"subsets": by_str(self.subsets), "epoch": self.epoch, "selections": self.selections,
                "light": by_str(self.light), "scoring_time_s": self.scoring_time_s,
                "teacher_forward": by_str(self.teacher_forward),
                "scoring": {str(b): {"forward": p.forward, "backward": p.backward} for b, p in self.scoring.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> CoresetState:
        def by_int(m):
            return None if m is None else {int(b): v for b, v in m.items()}
        return cls(by_int(d["subsets"]), d["epoch"], d["selections"], by_int(d["light"]) or None, d["scoring_time_s"],
                   by_int(d["teacher_forward"]), {int(b): Passes(**p) for b, p in d["scoring"].items()})

    def select(self, cfg: RunConfig, model: nn.Module, data: Dataset, epoch: int, light, dev) -> None:
        """Re-select every bit-width's subset at the start of ``epoch``, counting the scoring cost."""
        t0 = time.perf_counter()
        self.subsets, passes = select_subsets(model, data.train, cfg, epoch, light, dev)
        self.epoch, self.selections = epoch, self.selections + 1
        for b, p in passes.items():
            self.scoring[b].forward += p.forward
            self.scoring[b].backward += p.backward
        self.scoring_time_s += time.perf_counter() - t0
        model.train()

    def recorder(self, light: LightweightScores):
        """``on_logits`` for :func:`train_step`: update the lightweight scores, timing what it costs."""
        def record(b, index, logits, y):
            t0 = time.perf_counter()
            light.update(b, index, logits, y)
            self.scoring_time_s += time.perf_counter() - t0
        return record


@dataclass
class Companion:
    """Joint distillation's full-precision model and its optimizer, which travel together."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class TrainState:
    step: int = 0
    elapsed: float = 0.0  # seconds of training over all sessions of the run
    passes: dict = field(default_factory=dict)  # forward (= backward) sample-passes per bit-width
    eval_time: float = 0.0  # of which seconds spent on the per-epoch test evaluations
    coreset: CoresetState | None = None


def _checkpoint(run: Run, model, opt, state: TrainState, world: int = 1, companion: Companion | None = None) -> None:
    ckpt = {"config_hash": run.config.hash(), "step": state.step, "elapsed": state.elapsed,
            "eval_time": state.eval_time, "passes": state.passes, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "world_size": world}
    if companion is not None:
        ckpt.update(companion=companion.model.state_dict(), companion_optimizer=companion.optimizer.state_dict())
    if state.coreset is not None:
        ckpt["coreset"] = state.coreset.as_dict()
    save_torch(run.path / "checkpoint.pt", ckpt)


def _resume(run: Run, model, opt, device, world: int = 1, companion: Companion | None = None) -> TrainState:
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
        companion.model.load_state_dict(ckpt["companion"])
        companion.optimizer.load_state_dict(ckpt["companion_optimizer"])
    run.truncate_metrics(ckpt["step"])
    coreset = CoresetState.from_dict(ckpt["coreset"]) if ckpt.get("coreset") else None
    return TrainState(ckpt["step"], ckpt["elapsed"], dict(ckpt.get("passes", {})), ckpt.get("eval_time", 0.0), coreset)


def _sgd(model: nn.Module, t) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           nesterov=t.momentum > 0)


def _adam(model: nn.Module, t) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


# train.optimizer -> constructor(model, train config)
OPTIMIZERS = {"sgd": _sgd, "adam": _adam}
register("train.optimizer", OPTIMIZERS)


def make_optimizer(model: nn.Module, t) -> torch.optim.Optimizer:
    """``train.optimizer``: SGD (Nesterov when there is momentum) or Adam; weight decay is L2 in both."""
    return OPTIMIZERS[t.optimizer](model, t)


@dataclass
class _Session:
    """One session of training a run: what :func:`train` sets up once and every step uses."""

    cfg: RunConfig
    run: Run
    data: Dataset
    plan: Schedule
    subset_size: int
    par: distributed.Parallel
    dev: torch.device
    speed: speedups.Speed
    model: nn.Module
    step_model: nn.Module  # the model the forward passes go through (wrapped, compiled)
    opt: torch.optim.Optimizer
    companion: Companion | None
    state: TrainState
    light: LightweightScores | None = None
    record: Callable | None = None  # on_logits of the lightweight scores

    @property
    def pruning(self) -> bool:
        return self.state.coreset is not None


def _check_processes(cfg: RunConfig) -> None:
    t, world = cfg.train, distributed.from_env().world
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size {t.batch_size} does not split evenly over {world} processes")
    if world > 1 and (is_active(cfg) or t.distill == "joint"):
        raise ConfigError("coreset pruning and joint distillation train on one process only; leave out --nproc")


def _start(cfg: RunConfig, store: ResultsStore, device: str, data: Dataset | None) -> _Session:
    """Set a session up: data, model, optimizer(s), the run folder, and the state resumed from its checkpoint."""
    t = cfg.train
    _check_processes(cfg)
    par, dev = distributed.setup(device)  # one process, or this one of torchrun's (emq.training.distributed)
    data = data or load_data(cfg.data)  # before the run folder exists: bad data leaves no trace
    plan, subset_size = make_schedule(cfg, data.train.y)  # a too small subset leaves no trace either
    speed = speedups.resolve_speed(t, dev)
    model = distributed.prepare_model(build_model(cfg, data, dev), par, dev)
    step_model = speedups.prepare_model(distributed.wrap(model, par, dev), speed)  # the forward passes
    opt = make_optimizer(model, t)
    companion = None
    if t.distill == "joint":
        fp = make_companion(cfg, data, dev)
        companion = Companion(fp, make_optimizer(fp, t))
    if t.init_from and not (store.path_of(cfg) / "checkpoint.pt").is_file():  # else resumed from the checkpoint
        init_from_run(model, store, t.init_from, dev)  # before the run folder exists: a bad source leaves no trace
    run = store.run(cfg) if par.main else Run(store.path_of(cfg), cfg)  # only rank 0 writes
    state = _resume(run, model, opt, dev, par.world, companion)
    if is_active(cfg) and state.coreset is None:
        state.coreset = CoresetState.new(t.bits)
    s = _Session(cfg, run, data, plan, subset_size, par, dev, speed, model, step_model, opt, companion, state)
    if s.pruning and cfg.coreset.mode == "lightweight":
        cs = state.coreset
        s.light = LightweightScores(len(data.train), t.bits, cfg.coreset.score, cs.light)
        cs.light = s.light.values  # the same tensors, updated in place
        s.record = cs.recorder(s.light)
    return s


def _epoch_batches(s: _Session, epoch: int, start: int):
    """The batches of ``epoch`` from its step ``start``: shared, or each bit-width's own once pruning starts."""
    cfg, t = s.cfg, s.cfg.train
    if not s.pruning:
        return _shared_batches(s, epoch, start)
    if epoch < cfg.coreset.warmup_epochs:  # all children share the full-data batch
        return ({b: batch for b in t.bits} for batch in s.data.train.batches(
            t.batch_size, shuffle=True, augment=cfg.data.augment, seed=t.seed, epoch=epoch, start=start,
            device=s.dev))
    cs = s.state.coreset
    if selects_at(cfg, epoch) and cs.epoch != epoch:
        cs.select(cfg, s.model, s.data, epoch, s.light, s.dev)
    return bitwise_batches(s.data.train, cs.subsets, t.batch_size, seed=t.seed, epoch=epoch, start=start,
                           augment=cfg.data.augment, device=s.dev)


def _shared_batches(s: _Session, epoch: int, start: int):
    """The shared batches of ``epoch`` (this process's shard of each), from its step ``start``."""
    t = s.cfg.train
    return s.data.train.batches(t.batch_size, shuffle=True, augment=s.cfg.data.augment, seed=t.seed, epoch=epoch,
                                start=start, device=s.dev, shard=s.par.shard)


def _step(s: _Session, batch, epoch: int) -> dict:
    """One optimizer step on ``batch`` at the bit-widths the recipes choose; returns the losses."""
    t, state, total = s.cfg.train, s.state, s.plan.total
    optimizers = [s.opt] if s.companion is None else [s.opt, s.companion.optimizer]
    for o in optimizers:
        for group in o.param_groups:
            group["lr"] = learning_rate(s.cfg, state.step, total, s.plan.full_steps, epoch)
        o.zero_grad(set_to_none=True)
    bits = active_bits(t, state.step, total)
    advance_schedules(s.model, state.step, total)  # e.g. shift-bit's steepness
    configure = step_configure(t, s.model, state.step, total)
    with speedups.autocast(s.speed, s.dev):
        if s.pruning:
            batch = {b: batch[b] for b in bits}
            losses, extra = train_step(s.step_model, batch, t.distill, configure, on_logits=s.record)
            for b, n in extra.items():
                state.coreset.teacher_forward[b] += n
            sizes = {b: len(batch[b][1]) for b in bits}
        else:
            x, y, index = batch
            batches = shared_batch(speedups.prepare_input(x, s.speed), y, bits, index)
            fp = s.companion.model if s.companion is not None else None
            losses, _ = train_step(s.step_model, batches, t.distill, configure, fp, t.kd_temperature)
            sizes = {b: len(y) * s.par.world for b in (*bits, *(["companion"] if fp is not None else []))}
    for o in optimizers:
        o.step()
    for key, n in sizes.items():
        state.passes[str(key)] = state.passes.get(str(key), 0) + n
    state.step += 1
    return losses


def reference_epoch(epochs: int) -> int:
    """The epoch the last quarter of training is measured from (the plateau rule of
    :mod:`emq.book.plateau`): ``floor(3 E / 4)``, at least one epoch before the last (0, before
    training, for a one-epoch run)."""
    if epochs < 1:
        raise ValueError(f"a run has at least one epoch, got {epochs}")
    return min(3 * epochs // 4, epochs - 1)


def evaluated_epochs(epochs: int, every: int) -> set[int]:
    """The epochs (1-based) whose end evaluates the test set: every ``every``-th, the last, and the
    start of the last quarter, so that the plateau rule can always be read."""
    return {e for e in range(every, epochs + 1, every)} | {epochs} | ({reference_epoch(epochs)} - {0})


def _evaluate_epoch(s: _Session, epoch: int, losses: dict) -> None:
    """The end of an epoch: one metrics row, with the test accuracy at every trained bit-width at
    the epochs of :func:`evaluated_epochs`."""
    t_eval, state, par = time.perf_counter(), s.state, s.par
    losses = distributed.mean_over(losses, par, s.dev)
    row = {"epoch": epoch + 1, "step": state.step, "lr": s.opt.param_groups[0]["lr"],
           "loss": {str(b): v for b, v in losses.items()}, "elapsed_s": round(state.elapsed, 3)}
    if epoch + 1 in evaluated_epochs(s.cfg.train.epochs, s.cfg.train.eval_every):
        row["test_acc"] = {str(b): distributed.evaluate_sharded(s.model, s.data.test, b, par, s.dev)
                           for b in s.cfg.train.bits}
    if s.pruning:
        row["subset_size"] = s.subset_size if epoch >= s.cfg.coreset.warmup_epochs else len(s.data.train)
    if par.main:
        s.run.append_metrics(row)
    s.model.train()
    state.eval_time += time.perf_counter() - t_eval


def _finish(s: _Session) -> None:
    """Write the finished run: final weights, last subsets, environment and summary; drop the checkpoint."""
    run, state, cs = s.run, s.state, s.state.coreset
    save_torch(run.path / "model.pt", s.model.state_dict())
    if cs is not None:  # the last subset of every bit-width, for analyses of what was kept
        save_torch(run.path / "subsets.pt", cs.as_dict()["subsets"])
    metrics = run.metrics()
    final = metrics[-1]["test_acc"]
    write_json(run.path / "env.json", {**env_info(str(s.dev)), "processes": s.par.world, "speed": s.speed.as_dict()})
    write_json(run.path / "summary.json", {
        "acc": final, "wall_time_s": round(state.elapsed, 3), "eval_time_s": round(state.eval_time, 3),
        "steps": s.plan.total, "train_size": len(s.data.train), "test_size": len(s.data.test),
        **_cost(s.plan, cs, s.subset_size, state.passes), **best_epoch(metrics),
    })
    (run.path / "checkpoint.pt").unlink(missing_ok=True)


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
    s = _start(cfg, store, device, data)
    run, state, par, t, total = s.run, s.state, s.par, cfg.train, s.plan.total
    last = total if stop_after is None else min(total, max(stop_after, state.step + 1))
    bar = tqdm(total=total, initial=state.step, desc=f"train {run.hash}", disable=not (progress and par.main),
               unit="step", dynamic_ncols=True, leave=False)
    started = time.perf_counter() - state.elapsed
    s.model.train()
    with _stop_requests() as requested:
        while state.step < last:
            epoch, start = s.plan.locate(state.step)
            for batch in _epoch_batches(s, epoch, start):
                losses = _step(s, batch, epoch)
                requested["stop"] = distributed.any_true(requested["stop"], par, s.dev)
                state.elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[max(t.bits)]:.3f}")
                epoch_end = s.plan.locate(state.step)[1] == 0
                if epoch_end:
                    _evaluate_epoch(s, epoch, losses)
                saving = state.step % t.checkpoint_every == 0 if t.checkpoint_every else epoch_end
                if par.main and (saving or state.step == last or requested["stop"]):
                    _checkpoint(run, s.model, s.opt, state, par.world, s.companion)
                if requested["stop"]:
                    bar.close()
                    raise TrainingInterrupted(f"training of run {run.hash} stopped at step {state.step}/{total}; "
                                              f"checkpoint saved: run the same command again to resume")
                if state.step == last or epoch_end:
                    break
    bar.close()
    if state.step == total and par.main:  # else stopped by stop_after, or not the writing process
        _finish(s)
    distributed.barrier(par)
    return run


def best_epoch(metrics: list[dict]) -> dict:
    """The epoch of the highest test accuracy at the highest trained bit-width (32: full precision),
    the first of ties, and every bit-width's accuracy at it.

    Choosing the epoch on the test set is upstream's practice (Any-Precision's train.py keeps
    its ``model_best`` by 32-bit test accuracy), not ours: ``acc`` stays the last epoch's, and
    the book reports these fields only beside it, never instead of it.
    """
    evaluated = [row for row in metrics if "test_acc" in row]
    top = str(max(int(b) for b in evaluated[-1]["test_acc"]))
    best = max(evaluated, key=lambda row: (row["test_acc"][top], -row["epoch"]))
    return {"best_epoch": best["epoch"], "acc_at_best_epoch": best["test_acc"]}


def _cost(plan: Schedule, cs: CoresetState | None, subset_size: int, passes: dict) -> dict:
    """Sample-passes per bit-width (forward, backward, and teacher passes of bit-wise runs) and scoring."""
    if cs is None:
        return {"sample_passes": {k: {"forward": n, "backward": n} for k, n in passes.items()}, "scoring_passes": 0}
    return {
        "sample_passes": {k: {"forward": n, "backward": n, "teacher_forward": cs.teacher_forward[int(k)]}
                          for k, n in passes.items()},
        "scoring_passes": sum(p.forward + p.backward for p in cs.scoring.values()),
        "scoring_passes_by_bits": cs.as_dict()["scoring"], "scoring_time_s": round(cs.scoring_time_s, 4),
        "coreset": {"subset_size": subset_size, "selections": cs.selections,
                    "full_data_steps": plan.warmup * plan.full_steps,
                    "subset_steps": plan.total - plan.warmup * plan.full_steps},
    }
