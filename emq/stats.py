"""Seed statistics for the chapters: mean ± std tables and the comparisons behind verdicts."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

# Two methods "match" when their mean accuracies differ by at most this many percentage
# points; a difference is "clear" when it exceeds twice its standard error over seeds.
MATCH_MARGIN_PP = 1.0


def mean_std(df: pd.DataFrame, by: list[str], value: str = "acc") -> pd.DataFrame:
    """Mean, standard deviation (ddof=1; 0 for one seed) and count of ``value`` per group."""
    g = df.groupby(by, sort=True)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def pm_table(df: pd.DataFrame, index: str, columns: str, value: str = "acc", scale: float = 100.0,
             digits: int = 2) -> pd.DataFrame:
    """A wide table of ``mean ± std`` strings (values scaled, e.g. to percent)."""
    s = mean_std(df, [index, columns], value)
    s["cell"] = [f"{scale * m:.{digits}f} ± {scale * d:.{digits}f}" for m, d in zip(s["mean"], s["std"])]
    return s.pivot(index=index, columns=columns, values="cell")


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

    def describe(self) -> str:
        """E.g. ``-3.10 pp (± 0.80 s.e.)``."""
        return f"{self.diff_pp:+.2f} pp (± {self.se_pp:.2f} s.e.)"


def difference(a: pd.Series, b: pd.Series) -> Difference:
    """Mean of accuracies ``a`` minus mean of ``b`` (fractions in, percentage points out)."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("difference needs at least one value on each side")
    var = lambda s: float(s.var(ddof=1)) if len(s) > 1 else 0.0  # noqa: E731
    se = math.sqrt(var(a) / len(a) + var(b) / len(b)) if len(a) > 1 and len(b) > 1 else 0.0
    return Difference(100 * (float(a.mean()) - float(b.mean())), 100 * se, len(a), len(b))
