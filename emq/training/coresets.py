"""Bit-wise coreset sampling (METHOD.md §3): per-sample scores, selection, schedule and cost.

Each bit-width child trains on its own subset of the training set, the ``1 - p`` highest
scored samples at that bit-width (``p`` = pruning ratio). Scores are pure functions of
logits, features or gradients:

- EL2N  ``|| softmax(f_b(x)) - onehot(y) ||_2``;
- GraNd ``|| grad_theta CE(f_b(x), y) ||_2`` over every parameter (per-sample gradients with
  ``torch.func.vmap``), and its last-layer form: the gradient of CE with respect to the
  classifier's weight and bias is ``(p - onehot) h^T`` and ``p - onehot`` for features ``h``,
  so its norm is ``|| p - onehot || * sqrt(|| h ||^2 + 1)`` in closed form;
- loss ``CE(f_b(x), y)``; random (uniform); shard (disjoint random blocks, for §4's probes).

Scoring runs in eval mode (BatchNorm running statistics), batched, without augmentation.
The lightweight mode reads EL2N or loss from the logits training computes anyway
(:class:`LightweightScores`).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from emq.config import register
from emq.data.sampling import _mix
from emq.errors import ConfigError
from emq.nn.layers import set_bits


# ---- scores ----------------------------------------------------------------------------------
def el2n(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|| softmax(logits) - onehot(y) ||_2``."""
    return (F.softmax(logits.float(), dim=1) - F.one_hot(y, logits.shape[1]).float()).norm(dim=1)


def loss_score(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def grand_last(logits: torch.Tensor, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample norm of the gradient of CE with respect to the last linear layer (weight and bias)."""
    return el2n(logits, y) * torch.sqrt(features.float().pow(2).sum(1) + 1.0)


def grand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|| grad_theta CE(model(x_i), y_i) ||_2`` over every trainable parameter.

    One ``vmap`` over the batch of per-sample gradients (``torch.func``); the model should be
    in eval mode, so that BatchNorm uses its running statistics and samples are independent.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


def grand_last_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`grand_last` of a model with ``features`` and a last linear layer ``fc``."""
    h = model.features(x)
    return grand_last(model.fc(h), h, y)


@dataclass(frozen=True)
class Score:
    """A per-sample score: ``of_batch(model, x, y)`` scores a batch; ``from_logits(logits, y)``, where
    the training step's logits suffice (``coreset.mode`` lightweight); ``backward``: it costs a
    backward pass per sample (and runs on quarter batches, with gradients)."""

    of_batch: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    from_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    backward: bool = False


# The per-sample scores by name (``coreset.score``): a new score is a function and an entry here.
SAMPLE_SCORES: dict[str, Score] = {
    "el2n": Score(lambda model, x, y: el2n(model(x), y), from_logits=el2n),
    "grand": Score(grand, backward=True),
    "grand_last": Score(grand_last_of),
    "loss": Score(lambda model, x, y: loss_score(model(x), y), from_logits=loss_score),
}
# random: uniform scores, no pass; shard: disjoint random blocks, one per bit-width (select_shards)
SCORES = (*SAMPLE_SCORES, "random", "shard")
LIGHTWEIGHT_SCORES = tuple(name for name, s in SAMPLE_SCORES.items() if s.from_logits is not None)
MODES = ("static", "dynamic", "lightweight")
register("coreset.score", SCORES)
register("coreset.mode", MODES)
register("lightweight scores", LIGHTWEIGHT_SCORES)


@dataclass
class Passes:
    """Sample-passes of one bit-width: forward and backward."""

    forward: int = 0
    backward: int = 0


def score_split(model: nn.Module, split, bits: int, score: str, *, batch_size: int = 256,
                generator: torch.Generator | None = None, device="cpu") -> tuple[torch.Tensor, Passes]:
    """Scores of every sample of ``split`` at ``bits`` and the sample-passes it took.

    The model is left in eval mode at ``bits``. ``random`` draws from ``generator`` and costs
    no pass; ``grand`` costs a forward and a backward pass per sample, the others a forward.
    """
    n = len(split)
    if score == "random":
        return torch.rand(n, generator=generator), Passes()
    if score not in SAMPLE_SCORES:
        raise ValueError(f"score {score!r} is not a per-sample score: use {', '.join(SAMPLE_SCORES)} or random")
    s = SAMPLE_SCORES[score]
    set_bits(model.eval(), bits)
    out = []
    for x, y, _ in split.batches(max(1, batch_size // 4) if s.backward else batch_size, device=device):
        with contextlib.nullcontext() if s.backward else torch.no_grad():
            out.append(s.of_batch(model, x, y).detach().cpu())
    return torch.cat(out), Passes(n, n if s.backward else 0)


# ---- selection -------------------------------------------------------------------------------
def _check(scores: torch.Tensor, labels: torch.Tensor, prune: float) -> None:
    if len(scores) != len(labels):
        raise ValueError(f"scores for {len(scores)} samples, but the dataset has {len(labels)}: score this dataset")
    if not 0.0 <= prune < 1.0:
        raise ValueError(f"pruning ratio {prune} is outside [0, 1)")


def coreset_size(labels: torch.Tensor, prune: float, class_balanced: bool = False) -> int:
    """How many samples :func:`select_coreset` keeps: ``round((1 - p) N)``, or per class when balanced."""
    if not class_balanced:
        return round((1 - prune) * len(labels))
    return sum(round((1 - prune) * int(c)) for c in torch.bincount(labels) if c > 0)


def select_coreset(scores: torch.Tensor, labels: torch.Tensor, prune: float,
                   class_balanced: bool = False) -> torch.Tensor:
    """Sorted indices of the ``round((1 - p) N)`` highest scores (of every class, when balanced).

    Ties go to the lower index (a stable sort), so the selection is deterministic.
    """
    _check(scores, labels, prune)
    if not class_balanced:
        keep = torch.argsort(scores, descending=True, stable=True)[:coreset_size(labels, prune)]
        return keep.sort().values
    parts = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        order = torch.argsort(scores[members], descending=True, stable=True)
        parts.append(members[order[:round((1 - prune) * len(members))]])
    return torch.cat(parts).sort().values


def select_shards(n: int, size: int, bits: tuple[int, ...], offset: int,
                  generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Disjoint random blocks of ``size`` samples: the i-th bit-width (high to low) takes block ``i + offset``."""
    order = sorted(bits, reverse=True)
    if (len(order) + offset) * size > n:
        raise ValueError(f"{len(order) + offset} disjoint blocks of {size} samples do not fit in {n}")
    perm = torch.randperm(n, generator=generator)
    return {b: perm[(i + offset) * size:(i + offset + 1) * size].sort().values for i, b in enumerate(order)}


class LightweightScores:
    """EL2N or loss of every training sample at every bit-width, as last seen by training.

    Samples not visited yet score ``+inf`` (they are kept first). ``update`` costs one
    softmax of logits that the training step has already computed.
    """

    def __init__(self, n: int, bits: tuple[int, ...], score: str, state: dict | None = None):
        self.score = score
        self.values = state or {b: torch.full((n,), math.inf) for b in bits}

    def update(self, bits: int, index: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.values[bits][index] = SAMPLE_SCORES[self.score].from_logits(logits.detach(), y).cpu()


# ---- schedule --------------------------------------------------------------------------------
def is_active(cfg) -> bool:
    """Whether the run prunes at all: ``coreset.prune > 0``."""
    return cfg.coreset.prune > 0


@dataclass(frozen=True)
class Schedule:
    """Steps of a run: ``warmup`` epochs of ``full_steps`` on all data, then ``sub_steps`` per epoch."""

    full_steps: int
    sub_steps: int
    warmup: int
    epochs: int

    @property
    def total(self) -> int:
        return self.warmup * self.full_steps + (self.epochs - self.warmup) * self.sub_steps

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step; the end of training is (epochs, 0)."""
        warm = self.warmup * self.full_steps
        if step < warm:
            return divmod(step, self.full_steps)
        epoch, start = divmod(step - warm, self.sub_steps)
        return self.warmup + epoch, start


def make_schedule(cfg, labels: torch.Tensor) -> tuple[Schedule, int]:
    """The run's schedule and the subset size; a ValueError when a subset is smaller than one batch."""
    t, c, n = cfg.train, cfg.coreset, len(labels)
    full = n // t.batch_size
    if full == 0:
        raise ConfigError(f"train.batch_size {t.batch_size} is larger than the {n} training images")
    if not is_active(cfg):
        return Schedule(full, full, t.epochs, t.epochs), n
    size = coreset_size(labels, c.prune, c.class_balanced)
    if size < t.batch_size:
        raise ConfigError(f"coreset.prune {c.prune} keeps {size} of {n} training images, fewer than one batch "
                          f"of {t.batch_size}: lower the pruning ratio or the batch size")
    if c.score == "shard" and (len(t.bits) + c.shard_offset) * size > n:
        raise ConfigError(f"coreset.score 'shard': {len(t.bits) + c.shard_offset} disjoint blocks of {size} images "
                          f"do not fit in {n}: raise coreset.prune")
    return Schedule(full, size // t.batch_size, c.warmup_epochs, t.epochs), size


def selects_at(cfg, epoch: int) -> bool:
    """Whether subsets are (re-)selected at the start of ``epoch``."""
    c = cfg.coreset
    if not is_active(cfg) or epoch < c.warmup_epochs:
        return False
    return epoch == c.warmup_epochs or (c.mode != "static" and (epoch - c.warmup_epochs) % c.every == 0)


def bitwise_batches(split, subsets: dict[int, torch.Tensor], batch_size: int, *, seed: int, epoch: int,
                    start: int = 0, augment: bool = False, device="cpu") -> Iterator[dict[int, tuple]]:
    """Per step, one ``(x, y, index)`` batch per bit-width, each from its own subset.

    Each subset is shuffled by a generator seeded from (seed, epoch, bits), so a resumed run
    draws the batches an uninterrupted one would; ``index`` refers to ``split``.
    """
    iters = {}
    for b, index in subsets.items():
        sub = split.subset(index)
        iters[b] = ((x, y, index[i]) for x, y, i in sub.batches(batch_size, shuffle=True, augment=augment,
                                                               seed=_mix(seed, b), epoch=epoch, start=start,
                                                               device=device))
    while True:
        try:
            yield {b: next(it) for b, it in iters.items()}
        except StopIteration:
            return


# ---- cost ------------------------------------------------------------------------------------
def total_passes(summary: dict) -> int:
    """Every sample-pass of a run: forward, backward and teacher passes of all bit-widths, plus scoring."""
    train = sum(sum(v.values()) for v in summary["sample_passes"].values())
    return train + summary.get("scoring_passes", 0)


def training_time(summary: dict) -> float:
    """Wall time of a run less its per-epoch test evaluations (scoring included)."""
    return summary["wall_time_s"] - summary.get("eval_time_s", 0.0)


def cost_ratio(baseline: dict, run: dict) -> dict[str, float]:
    """How many times cheaper ``run`` is than ``baseline`` (two run summaries): in sample-passes, and
    in wall time less the per-epoch test evaluations (which both runs make alike)."""
    return {"passes": total_passes(baseline) / total_passes(run),
            "wall_time": training_time(baseline) / training_time(run)}


def select_subsets(model: nn.Module, split, cfg, epoch: int, light: LightweightScores | None = None,
                   device="cpu") -> tuple[dict[int, torch.Tensor], dict[int, Passes]]:
    """One subset per trained bit-width, selected at the start of ``epoch``, and the scoring passes.

    Random scores and shards come from a generator seeded by (train.seed, epoch), so runs of
    the same seed (and a resumed run) select the same subsets.
    """
    c, bits = cfg.coreset, cfg.train.bits
    gen = torch.Generator().manual_seed(_mix(cfg.train.seed, epoch, 0xC0))
    if c.score == "shard":
        size = coreset_size(split.y, c.prune)
        return select_shards(len(split), size, bits, c.shard_offset, gen), {b: Passes() for b in bits}
    subsets, passes = {}, {}
    for b in sorted(bits, reverse=True):
        if c.mode == "lightweight":
            scores, passes[b] = light.values[b], Passes()
        else:
            scores, passes[b] = score_split(model, split, b, c.score, generator=gen, device=device)
        subsets[b] = select_coreset(scores, split.y, c.prune, c.class_balanced)
    return subsets, passes
