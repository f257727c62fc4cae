"""Quantizers of METHOD.md §1 and the weight bias correction of §2, as pure functions.

Every function takes tensors and plain arguments and returns tensors; gradients flow
through rounding by the straight-through estimator (``round_ste``). ``bits == 32`` always
means full precision.
"""
from __future__ import annotations

import torch

from emq.config import register
from emq.quant.ste import round_ste

FULL_PRECISION = 32
SUPPORTED_BITS = tuple(range(1, 17)) + (FULL_PRECISION,)
CORRECTIONS = ("none", "mean", "meanvar")


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported bit-width, else raise a one-line ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit-width {bits!r}: use an integer in 1..16, or 32 for full precision")
    return bits



register("quant.correction", CORRECTIONS)
register("bits", check_bits)

def levels(bits: int) -> int:
    """Number of quantization steps ``n_b = 2^b - 1``."""
    return 2 ** check_bits(bits) - 1


def quantize_weight(w: torch.Tensor, bits: int, scale_by_mean: bool = False) -> torch.Tensor:
    """DoReFa weight quantizer ``Q_b(W)`` (per tensor).

    ``t = tanh(W)``, ``m = max|t|`` (detached), ``u = t/(2m) + 1/2``;
    ``Q_b(W) = 2 round(n_b u)/n_b - 1`` for b < 32 and ``t/m`` for b = 32.
    With ``scale_by_mean`` the result is multiplied by ``E = mean|W|`` (detached).
    """
    t = torch.tanh(w)
    m = t.abs().max().detach().clamp_min(1e-12)
    if check_bits(bits) == FULL_PRECISION:
        q = t / m
    else:
        n = levels(bits)
        q = 2 * round_ste(n * (t / (2 * m) + 0.5)) / n - 1
    if scale_by_mean:
        q = q * w.abs().mean().detach()
    return q


def quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``q_b(x) = round(n_b clamp(x, 0, 1)) / n_b``; for b = 32 the clamp alone.

    The gradient is the straight-through one: that of ``n_b clamp(x, 0, 1) / n_b`` with ``round``
    passed through (:func:`activation_reference` spells it out with autograd). Computed by one
    autograd function, :class:`ClampQuantize`, whose output and gradient equal the reference's bit for bit.
    """
    return ClampQuantize.apply(x, 0 if check_bits(bits) == FULL_PRECISION else levels(bits))


def activation_reference(x: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`quantize_activation` as plain autograd operations (the definition :class:`ClampQuantize` keeps)."""
    x = torch.clamp(x, 0.0, 1.0)
    if check_bits(bits) == FULL_PRECISION:
        return x
    n = levels(bits)
    return round_ste(n * x) / n


class ClampQuantize(torch.autograd.Function):
    """``round(n clamp(x, 0, 1)) / n`` (``n = 0``: the clamp alone) with the straight-through gradient.

    The same values and gradients as :func:`activation_reference`, with fewer passes over the
    activations: the reference's clamp backward (two comparisons, a logical and, a ``where`` on a
    boolean mask) is one fused ``hardtanh_backward``, which passes the gradient where the clamp's does
    (strictly inside (0, 1)) several times faster on the CPU, and the rounding needs no
    straight-through sum. The gradient keeps the reference's ``(g / n) * n``.
    """

    generate_vmap_rule = True  # per-sample gradients (torch.func, chapter 04's GraNd scores)

    @staticmethod
    def forward(x: torch.Tensor, n: int) -> torch.Tensor:
        y = torch.clamp(x, 0.0, 1.0)
        # + 0.0: the reference's straight-through sum turns round(-0.0) into +0.0; so does this
        return y.mul_(n).round_().add_(0.0).div_(n) if n else y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, n = inputs
        ctx.save_for_backward(x)
        ctx.n = n

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad = torch.ops.aten.hardtanh_backward(g, x, 0.0, 1.0)
        return (grad.div_(ctx.n).mul_(ctx.n) if ctx.n else grad), None  # (g / n) * n in place; 0 stays +0


def channel_stats(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel mean and (population) standard deviation, shaped to broadcast on ``w``."""
    dims = tuple(range(1, w.dim()))
    mean = w.mean(dim=dims, keepdim=True)
    std = w.std(dim=dims, keepdim=True, unbiased=False)
    return mean, std


# std(q[c]) at or below this many float epsilons of max|q[c]| (7.6e-6 of it in float32) is rounding
# noise: the channel is flat. A genuine spread is far above it: n weights of which one sits a level
# step d away from the others have std = d * sqrt(n - 1) / n; at 8 bits (d = 2/255 of a grid over
# [-max, max]) and n = 4608 (a 3x3 conv with 512 inputs) that is 1.2e-4 of max|q[c]|.
FLAT_SPREAD = 64


def correct_weight_bias(q: torch.Tensor, ref: torch.Tensor, mode: str, detach_stats: bool = True) -> torch.Tensor:
    """Weight bias correction of METHOD.md §2, per output channel c.

    mean:    ``q[c] - mean(q[c]) + mean(ref[c])``
    meanvar: ``(q[c] - mean(q[c])) * std(ref[c]) / std(q[c]) + mean(ref[c])`` (mean alone where
    ``std(q[c])`` is zero: all of the channel's weights on one level; zero means at most
    :data:`FLAT_SPREAD` float epsilons of ``max|q[c]|``, rounding noise, at any weight scale)
    ``ref`` is the full-precision effective weight ``Q_32(W)``. With ``detach_stats`` the four
    statistics are constants for the backward pass.
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown correction {mode!r}: use one of {', '.join(CORRECTIONS)}")
    if mode == "none":
        return q
    q_mean, q_std = channel_stats(q)
    r_mean, r_std = channel_stats(ref)
    if detach_stats:
        q_mean, q_std, r_mean, r_std = (s.detach() for s in (q_mean, q_std, r_mean, r_std))
    centred = q - q_mean
    if mode == "meanvar":
        # A channel whose quantized weights all sit on one level has no spread to rescale:
        # it gets the mean correction alone (its centred weights are zero up to rounding).
        # Relative to the channel's magnitude, so that weights of scale 1e-6 are rescaled too.
        scale = q.detach().abs().amax(dim=tuple(range(1, q.dim())), keepdim=True)
        spread = q_std > FLAT_SPREAD * torch.finfo(q.dtype).eps * scale
        centred = centred * torch.where(spread, r_std / torch.where(spread, q_std, 1.0), 1.0)
    return centred + r_mean
