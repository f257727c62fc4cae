"""Seed statistics for the chapters: ``mean ± spread`` (or "(1 seed)") tables; the comparisons
behind verdicts (a difference over seeds, the trained neighbours' line at an untrained bit-width,
the largest pruning ratio within a margin); and :func:`select`, the rows of a frame they compare."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

# Two methods "match" when their mean accuracies differ by at most this many percentage
# points; a difference is "clear" when it exceeds twice its standard error over seeds.
MATCH_MARGIN_PP = 1.0


def select(df: pd.DataFrame, column: str | None = "acc", **equal) -> pd.Series | pd.DataFrame:
    """The ``column`` of the rows of ``df`` whose columns equal the values given, in the order of
    ``df``: ``select(acc, method="shared", bits=2, recal=0)`` is the 2-bit zero-shot accuracies of
    shared BN. A list, tuple or set keeps the rows whose column is any of its values
    (``seed=[0, 1]``); ``column=None`` gives the whole rows."""
    keep = pd.Series(True, index=df.index)
    for name, value in equal.items():
        keep &= df[name].isin(value) if isinstance(value, (list, tuple, set, frozenset)) else df[name] == value
    rows = df[keep]
    return rows if column is None else rows[column]


def mean_std(df: pd.DataFrame, by: list[str], value: str = "acc") -> pd.DataFrame:
    """Mean, standard deviation (ddof=1; 0 for one seed) and count of ``value`` per group."""
    g = df.groupby(by, sort=True)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def format_value(value: float, spread: float, n: int, digits: int = 1, sign: bool = False, unit: str = "") -> str:
    """``"84.2 ± 0.3"`` (``unit`` after the spread), or ``"84.2 (1 seed)"`` where ``n`` is 1: one
    seed has no spread, and a single seed must never read as zero variance. The one place where
    the book writes a value with its spread (:func:`format_mean_se`, :func:`pm_table`,
    :meth:`Difference.describe`)."""
    shown = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    return f"{shown}{unit} (1 seed)" if n == 1 else f"{shown} ± {spread:.{digits}f}{unit}"


def format_mean_se(values: Sequence[float], digits: int = 1, scale: float = 1.0, spread: str = "se") -> str:
    """``"84.2 ± 0.3"``: the mean over seeds ± its standard error, or ``"84.2 (1 seed)"`` for one value.

    The standard error is ``std / sqrt(n)`` with the sample standard deviation (ddof = 1) of
    :func:`mean_std`; ``spread="std"`` shows that standard deviation instead. Values are
    multiplied by ``scale`` (100 turns accuracies into percent).
    """
    if spread not in ("se", "std"):
        raise ValueError(f"unknown spread {spread!r}: use se (standard error) or std (standard deviation)")
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("format_mean_se needs at least one value")
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"format_mean_se got NaN among {vals}: a run is missing or failed")
    row = mean_std(pd.DataFrame({"group": 0, "value": vals}), ["group"], "value").iloc[0]
    width = row["std"] / math.sqrt(row["count"]) if spread == "se" else row["std"]
    return format_value(scale * row["mean"], scale * width, len(vals), digits)


def pm_table(df: pd.DataFrame, index: str, columns: str, value: str = "acc", scale: float = 100.0,
             digits: int = 2, spread: str = "std") -> pd.DataFrame:
    """A wide table of ``mean ± std`` strings (values scaled, e.g. to percent; ``spread="se"``
    for the standard error), with ``value (1 seed)`` in a cell of one seed."""
    cells = df.groupby([index, columns], sort=True)[value].agg(
        lambda s: format_mean_se(s, digits=digits, scale=scale, spread=spread))
    return cells.unstack(columns)


@dataclass(frozen=True)
class Difference:
    """``a - b`` of two groups of seeds, in percentage points."""

    diff_pp: float
    se_pp: float  # standard error of the difference (0 with one seed per side)
    n_a: int
    n_b: int

    @property
    def clear(self) -> bool:
        """Larger than twice its standard error (never with a single seed on both sides)."""
        return self.se_pp > 0 and abs(self.diff_pp) > 2 * self.se_pp

    @property
    def matches(self) -> bool:
        return abs(self.diff_pp) <= MATCH_MARGIN_PP

    def reading(self, test: str = "order") -> str:
        """What the difference says under a chapter's test. ``"order"``: ``"ahead"`` or ``"behind"`` where it
        is clear (``a`` against ``b``), else ``"no clear difference"``; ``"match"``: ``"matches"`` (within
        :data:`MATCH_MARGIN_PP`) or ``"does not match"``."""
        if test == "order":
            return ("ahead" if self.diff_pp > 0 else "behind") if self.clear else "no clear difference"
        if test == "match":
            return "matches" if self.matches else "does not match"
        raise ValueError(f"unknown test {test!r}: use order or match")

    def describe(self) -> str:
        """E.g. ``-3.10 ± 0.80 pp (s.e.)``, or ``-3.10 pp (1 seed)`` where a side has one seed
        (no standard error can be estimated then)."""
        n = min(self.n_a, self.n_b)
        text = format_value(self.diff_pp, self.se_pp, n, digits=2, sign=True, unit=" pp")
        return text if n == 1 else f"{text} (s.e.)"


def difference(a: pd.Series, b: pd.Series) -> Difference:
    """Mean of accuracies ``a`` minus mean of ``b`` (fractions in, percentage points out)."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("difference needs at least one value on each side")
    var = lambda s: float(s.var(ddof=1)) if len(s) > 1 else 0.0  # noqa: E731
    se = math.sqrt(var(a) / len(a) + var(b) / len(b)) if len(a) > 1 and len(b) > 1 else 0.0
    return Difference(100 * (float(a.mean()) - float(b.mean())), 100 * se, len(a), len(b))


def interpolate_neighbours(df: pd.DataFrame, bits: int, trained: Sequence[int], column: str = "acc",
                           **equal) -> pd.Series:
    """What the untrained bit-width ``bits`` would reach on the straight line between its trained
    neighbours, the nearest trained bit-widths ``lo`` below and ``hi`` above it: for each seed,
    ``(1 - w) a(lo) + w a(hi)`` with ``w = (bits - lo) / (hi - lo)`` and ``a(t)`` the rows
    ``select(df, column, bits=t, **equal)``, which pair in the order of ``df`` (the same seeds)."""
    below, above = [t for t in trained if t < bits], [t for t in trained if t > bits]
    if not below or not above:
        raise ValueError(f"{bits} bits needs a trained bit-width on each side, got {sorted(trained)}")
    lo, hi = max(below), min(above)
    a_lo, a_hi = select(df, None, bits=lo, **equal), select(df, None, bits=hi, **equal)
    pairs = [(list(a.seed) if "seed" in df else len(a)) for a in (a_lo, a_hi)]
    if pairs[0] != pairs[1]:
        raise ValueError(f"the runs at {lo} and {hi} bits are not the same seeds: {pairs[0]} and {pairs[1]}")
    w = (bits - lo) / (hi - lo)
    return (1 - w) * a_lo[column].reset_index(drop=True) + w * a_hi[column].reset_index(drop=True)


def largest_ratio_within(worst_pp: dict[float, float], margin_pp: float) -> float:
    """How far a method prunes within ``margin_pp`` of the baseline: going up the pruning ratios of
    ``worst_pp`` (ratio -> its worst bit-width's difference to the baseline, in percentage points),
    the last ratio before the first that falls more than ``margin_pp`` below; 0 if the smallest does."""
    within = 0.0
    for ratio in sorted(worst_pp):
        if worst_pp[ratio] < -margin_pp:
            break
        within = ratio
    return within
