"""Training recipes of the related methods (METHOD.md §5), as pure schedule functions.

The training loop asks, at every step, which bit-widths to train, how to switch the model to
one of them and how steep the shift-bit staircase is; each answer is a function of the config
and the position in training, so a resumed run takes the same decisions.

- Progressive quantization (Zhuang et al.): ``weights_first`` trains with full-precision
  activations for the first half of the steps and quantized ones after; ``bits`` lowers the
  bit-width step by step: with trained bits {32, 8, 4, 2}, the first quarter of the steps trains
  {32}, the next {32, 8}, then {32, 8, 4}, then all. (Zhuang et al. train one network per target
  bit-width; in a multi-bit network the stages add bit-widths instead of replacing them.)
- Stochastic precision: at each step a random subset of the residual blocks is quantized, the
  rest run at full precision; the quantized share rises linearly from
  ``train.stochastic_precision`` at the first step to 1 at the last.
- Joint knowledge distillation: a full-precision companion trained alongside; each bit-width's
  loss is ``CE + T^2 KL(fp/T || q/T)``, the companion's ``CE + T^2 KL(q/T || fp/T)`` averaged
  over the bit-widths (the losses: :mod:`emq.training.distill`).
- Shift-bit: the staircase's steepness grows geometrically from ``quant.steepness_start`` to
  ``quant.steepness_end`` over training.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from emq.config import ConfigError, QuantConfig, TrainConfig, register
from emq.nn.layers import set_bits
from emq.quant.quantizers import FULL_PRECISION
from emq.quant.shiftbit import steepness_at

Configure = Callable[[nn.Module, int], None]

# train.progressive: none | weights_first (act_bits) | bits (active_bits)
PROGRESSIVE = ("none", "weights_first", "bits")
register("train.progressive", PROGRESSIVE)


def stage(step: int, total: int, stages: int) -> int:
    """Which of ``stages`` equal shares of ``total`` steps the (0-based) ``step`` falls in."""
    return min(stages - 1, step * stages // total)


def active_bits(t: TrainConfig, step: int, total: int) -> tuple[int, ...]:
    """The bit-widths trained at ``step``, high to low."""
    ordered = tuple(sorted(t.bits, reverse=True))
    if t.progressive != "bits":
        return ordered
    return ordered[: stage(step, total, len(ordered)) + 1]


def act_bits(t: TrainConfig, step: int, total: int) -> int | None:
    """The activations' bit-width override at ``step`` (None: the same as the weights')."""
    if t.progressive == "weights_first" and stage(step, total, 2) == 0:
        return FULL_PRECISION
    return None


def quantized_share(t: TrainConfig, step: int, total: int) -> float:
    """Share of blocks quantized at ``step`` under stochastic precision (1 when it is off)."""
    if t.stochastic_precision == 0:
        return 1.0
    r0 = t.stochastic_precision
    return r0 + (1 - r0) * step / max(1, total - 1)


def quantized_blocks(n: int, share: float, seed: int, step: int) -> torch.Tensor:
    """A boolean mask over ``n`` blocks, ``round(share n)`` of them True, drawn from (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: round(share * n)]] = True
    return mask


def steepness(q: QuantConfig, step: int, total: int) -> float:
    """The shift-bit steepness at ``step``: geometric from ``steepness_start`` to ``steepness_end``."""
    return steepness_at(q.steepness_start, q.steepness_end, step, total)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The units stochastic precision draws from: the model's residual blocks."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ConfigError(f"stochastic precision needs a model with residual blocks ({type(model).__name__} has none)")
    return list(blocks)


def step_configure(t: TrainConfig, model: nn.Module, step: int, total: int) -> Configure:
    """How to switch ``model`` to bit-width ``b`` at ``step`` of ``total``: ``configure(model, b)``."""
    a = act_bits(t, step, total)
    mask = None
    if t.stochastic_precision:
        blocks = blocks_of(model)
        mask = quantized_blocks(len(blocks), quantized_share(t, step, total), t.seed, step)

    def configure(m: nn.Module, b: int) -> None:
        set_bits(m, b, a)
        if mask is not None and b != FULL_PRECISION:
            for block, quantized in zip(blocks, mask.tolist()):
                if not quantized:
                    set_bits(block, FULL_PRECISION)

    return configure
