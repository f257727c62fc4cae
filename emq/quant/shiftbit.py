"""Shift-bit (power-of-two) quantization, made differentiable by a soft staircase.

Levels ``{0, +-alpha 2^-j}``: at b bits one sign bit and ``2^(b-1) - 1`` magnitudes
``alpha, alpha/2, ..., alpha 2^-(2^(b-1)-2)``. The exact formula of the paper is not public;
ours (METHOD.md §5) is the sum of sigmoids ``sum_i delta_i sigmoid(lambda (|w| - t_i) / alpha)`` over
the thresholds ``t_i`` halfway between consecutive magnitudes, with ``delta_i`` the step
between them, the sign restored. As ``lambda`` grows the staircase becomes the hard
quantizer: each |w| goes to the nearest level.

Gradient scaling (also our choice, the paper's is not public): the staircase's slope is near
zero between thresholds and of order ``lambda`` at them, so its raw gradient shrinks or explodes
as ``lambda`` grows. ``shift_scaled`` divides the gradient by the slope's mean over the tensor,
so the mean gradient a weight receives stays 1 (what a straight-through estimator passes) at
every steepness.
"""
from __future__ import annotations

import torch

from emq.quant.quantizers import check_bits
from emq.quant.ste import scale_grad


def shift_levels(bits: int, alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The non-negative magnitudes ``[0, alpha 2^-(m-1), ..., alpha/2, alpha]``, ascending."""
    if check_bits(bits) < 2:
        raise ValueError(f"shift-bit quantization has no {bits}-bit level set: it needs a sign bit and at least one "
                         f"magnitude bit (2 bits or more)")
    m = 2 ** (bits - 1) - 1  # number of non-zero magnitudes
    exps = torch.arange(m - 1, -1, -1, dtype=torch.float64)
    mags = torch.cat([torch.zeros(1, dtype=torch.float64), 2.0 ** (-exps)])
    return mags * alpha


ALPHA_CANDIDATES = 4  # alpha = max|w| 2^-k for k = 0, ..., 3


def shift_alpha(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The largest level ``alpha``: of ``max|w| 2^-k`` (k < ALPHA_CANDIDATES), the one whose hard
    quantizer has the least squared error on ``w`` (detached). With ``alpha = max|w|`` at 2 bits
    (levels 0 and +-alpha) every weight below half the largest would be zero."""
    w = w.detach()
    top = w.abs().max().clamp_min(1e-12)
    candidates = [top / 2 ** k for k in range(ALPHA_CANDIDATES)]
    errors = torch.stack([(shift_hard(w, bits, a) - w).pow(2).sum() for a in candidates])
    return candidates[int(errors.argmin())]


def _staircase(w: torch.Tensor, bits: int, alpha: torch.Tensor | None):
    alpha = shift_alpha(w, bits) if alpha is None else alpha
    levels = shift_levels(bits).to(w.dtype).to(w.device) * alpha
    return alpha, levels, (levels[1:] + levels[:-1]) / 2, levels[1:] - levels[:-1]


def shift_soft(w: torch.Tensor, bits: int, lam: float, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """The soft staircase at steepness ``lam``; ``alpha`` defaults to ``shift_alpha(w, bits)``."""
    alpha, _, thresholds, deltas = _staircase(w, bits, alpha)
    mag = (deltas * torch.sigmoid(lam * (w.abs().unsqueeze(-1) - thresholds) / alpha)).sum(-1)
    return torch.sign(w) * mag


def shift_slope(w: torch.Tensor, bits: int, lam: float, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """``d shift_soft / d w`` per element (the staircase is odd, so its slope is even in ``w``)."""
    alpha, _, thresholds, deltas = _staircase(w.detach(), bits, alpha)
    s = torch.sigmoid(lam * (w.detach().abs().unsqueeze(-1) - thresholds) / alpha)
    return (deltas * lam / alpha * s * (1 - s)).sum(-1)


def shift_scaled(w: torch.Tensor, bits: int, lam: float) -> torch.Tensor:
    """``shift_soft`` in the forward pass, its gradient divided by the mean slope over ``w``."""
    alpha = shift_alpha(w, bits)
    mean_slope = shift_slope(w, bits, lam, alpha).mean().clamp_min(1e-12)
    return scale_grad(shift_soft(w, bits, lam, alpha), float(1.0 / mean_slope))


def shift_hard(w: torch.Tensor, bits: int, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """The hard quantizer: the nearest power-of-two level (or 0), the sign restored."""
    _, levels, thresholds, _ = _staircase(w, bits, alpha)
    idx = torch.bucketize(w.abs(), thresholds, right=True)
    return torch.sign(w) * levels[idx]


def steepness_at(start: float, end: float, step: int, total: int) -> float:
    """The soft staircase's steepness at ``step`` of ``total``: geometric from ``start`` to ``end``."""
    return start * (end / start) ** (step / max(1, total - 1))
