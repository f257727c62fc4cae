"""Is a network still learning? The last-quarter gain, and the rule that a comparison is a
verdict only at a plateau.

A run's *last-quarter gain* is the change of its test accuracy at its highest trained bit-width
(32 bits, full precision, wherever that is trained) over the last quarter of its training, in
percentage points, from its per-epoch metrics (``Run.metrics()``): the least-squares line through
every evaluation from epoch ``q`` to the last epoch ``E``, read as the change it makes from ``q`` to
``E``,

    gain = slope * (E - q),   q = min(floor(3 E / 4), E - 1)

where ``q`` is the epoch the last quarter starts from: epoch 3 of 4, 12 of 16, 72 of 96, and always
at least one epoch before the end (epoch 1 of 2, 2 of 3). With two evaluations (``q`` and ``E``)
the line is their difference. A run of one epoch (the smoke profile) has no epoch before its last:
its reference is the network before training, counted as accuracy 0 (also for a fine-tuned run,
whose start is not measured), so all it learned is its gain and it is never at a plateau.
:func:`two_reading_gain` is the difference of the two end readings alone (the book's first rule).

A *method* (its runs, one per seed) is at a plateau when the mean of its runs' gains is within
:data:`PLATEAU_PP` of zero by more than its standard error over seeds:

    |mean gain| + s.e. < PLATEAU_PP

so one run is at a plateau when its gain is below 0.5 pp either way (a run whose accuracy fell by
more is not flat either, it is unstable), and seeds whose single readings scatter must agree
closely enough for their mean to be read at 0.5 pp. A comparison of methods is a verdict "at a
plateau" only when every method in it is; otherwise the networks are still learning, and the
comparison says what these runs show, not which method is better.

A comparison at a bit-width where its methods still rise (a low one, whose accuracy under a cosine
schedule gains most as the learning rate falls, however long the schedule) can be a verdict by the
*doubling rule* instead (:class:`Doubled`, :func:`doubling_check`): trained at twice the epochs as
well, its methods flat at the highest bit-width at both lengths, it reads the same at both under its
chapter's test.

Why a line and a mean over seeds, rather than one reading at each end of every run: near the end of
training one zero-shot reading of a shared-BN network differs from the next by 0.5-1.9 pp (sd; the
scale study's "how fine the rule can see"), so the first rule could not pass three flat seeds. The
line uses every reading of the last quarter, the mean every seed. This rule was fixed before the
96-epoch runs of chapter 02's shared + mean and all-bit-width control, of chapter 03 and of chapter
06's LSQ, Double Rounding, shift-bit and full precision were trained, and checked on the scale
study's doubling runs (chapter 00), whose one-reading gains had been seen before.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd

from emq.analysis.stats import Difference, difference, format_mean_se, select
from emq.book.plots import show_table
from emq.training.loop import reference_epoch

PLATEAU_PP = 0.5  # percentage points over the last quarter of training


def _curve(run_or_rows) -> dict[int, dict[int, float]]:
    """epoch -> {bits: test accuracy} from a run's metric rows, or from the rows themselves (rows without
    both are other records)."""
    rows: Iterable[Mapping] = run_or_rows.metrics() if hasattr(run_or_rows, "metrics") else run_or_rows
    curve = {}
    for row in rows:
        if "epoch" in row and "test_acc" in row:
            curve[int(row["epoch"])] = {int(b): float(a) for b, a in row["test_acc"].items()}
    return curve


def _last_quarter(run_or_rows, bits: int | None) -> list[tuple[int, float]]:
    """(epoch, test accuracy in %) at ``bits`` (default: the highest bit-width of the last epoch) for
    every evaluation from the start of the last quarter to the end; epoch 0 (accuracy 0) where the last
    quarter starts before training."""
    curve = _curve(run_or_rows)
    if not curve:
        raise ValueError("no per-epoch test accuracy in the run's metrics: has it trained?")
    last = max(curve)
    bits = max(curve[last]) if bits is None else bits
    ref = reference_epoch(last)
    if ref != 0 and ref not in curve:
        raise ValueError(f"the metrics have no epoch {ref}, where the last quarter of {last} epochs starts")
    points = [(0, 0.0)] if ref == 0 else []
    points += [(e, 100.0 * curve[e].get(bits, math.nan)) for e in sorted(curve) if e >= max(ref, 1)]
    if any(math.isnan(a) for e, a in points if e in (ref, last)):
        raise ValueError(f"no {bits}-bit test accuracy at epoch {last} or {ref}")
    return [(e, a) for e, a in points if not math.isnan(a)]


def last_quarter_gain(run_or_rows, bits: int | None = None) -> float:
    """The last-quarter gain of a run (or of its metric rows), in percentage points, at ``bits``
    (default: the highest bit-width of its last epoch): the least-squares line through its evaluations
    from the start of the last quarter to the end, times the quarter's length in epochs."""
    points = _last_quarter(run_or_rows, bits)
    epochs, accs = [e for e, _ in points], [a for _, a in points]
    e_mean, a_mean = sum(epochs) / len(epochs), sum(accs) / len(accs)
    slope = (sum((e - e_mean) * (a - a_mean) for e, a in points)
             / sum((e - e_mean) ** 2 for e in epochs))
    return slope * (epochs[-1] - epochs[0])


def two_reading_gain(run_or_rows, bits: int | None = None) -> float:
    """The last evaluation minus the one at the start of the last quarter (pp): the book's first rule,
    one reading at each end."""
    points = _last_quarter(run_or_rows, bits)
    return points[-1][1] - points[0][1]


@dataclass(frozen=True)
class Gains:
    """The last-quarter gains of one method's runs (one per seed)."""

    gains: tuple[float, ...]
    bits: int
    epochs: int
    swings: tuple[float, ...] = ()  # per run: highest minus lowest accuracy evaluated in the last quarter, pp

    @property
    def mean(self) -> float:
        return sum(self.gains) / len(self.gains)

    @property
    def se(self) -> float:
        """The standard error of :attr:`mean` over seeds (ddof = 1; 0 for one run)."""
        n = len(self.gains)
        if n == 1:
            return 0.0
        return math.sqrt(sum((g - self.mean) ** 2 for g in self.gains) / (n - 1) / n)

    @property
    def bound(self) -> float:
        """``|mean| + s.e.``: how far from flat the method is, within one standard error (pp)."""
        return abs(self.mean) + self.se

    @property
    def largest(self) -> float:
        """The gain of the run that changed most, either way (signed)."""
        return max(self.gains, key=abs)

    @property
    def at_plateau(self) -> bool:
        return self.bound < PLATEAU_PP

    def describe(self) -> str:
        """``"1.20 ± 0.30"``: mean ± standard error over seeds, or ``"1.20 (1 seed)"``."""
        return format_mean_se(self.gains, digits=2)


def method_gains(runs: Iterable, bits: int | None = None) -> Gains:
    """The last-quarter gains of a set of runs (one method over seeds) at ``bits`` (default: the
    highest trained bit-width)."""
    runs = list(runs)
    if not runs:
        raise ValueError("method_gains needs at least one run")
    rows = [r.metrics() for r in runs]
    curves = [_curve(r) for r in rows]
    gains = tuple(last_quarter_gain(r, bits) for r in rows)
    read = bits if bits is not None else max(max(c[max(c)]) for c in curves)
    return Gains(gains, read, max(max(c) for c in curves), tuple(last_quarter_swing(c, bits) for c in curves))


def last_quarter_swing(curve: dict[int, dict[int, float]], bits: int | None = None) -> float:
    """Highest minus lowest test accuracy (pp) at ``bits`` (default: the highest bit-width) over the
    epochs evaluated from the start of the last quarter to the end: how much the accuracy moves there,
    trend or not."""
    last = max(curve)
    bits = max(curve[last]) if bits is None else bits
    accs = [100.0 * acc[bits] for epoch, acc in curve.items() if epoch >= reference_epoch(last) and bits in acc]
    return max(accs) - min(accs)


def late_steps(run_or_rows, start: float = 5 / 6) -> list[float]:
    """The changes (pp) of test accuracy at the highest trained bit-width from one evaluation to the
    next, over the evaluations from the fraction ``start`` of the epochs on: at the end of a cosine
    schedule, where the learning rate is a few percent of its peak, how far a network that has all but
    stopped moves between two readings."""
    curve = _curve(run_or_rows)
    last = max(curve)
    bits = max(curve[last])
    accs = [100.0 * curve[e][bits] for e in sorted(curve) if e >= start * last and bits in curve[e]]
    return [b - a for a, b in zip(accs, accs[1:])]


def chance_of_passing(step_sd: float) -> float:
    """The probability that a run which no longer learns passes the rule, when one reading differs from
    another by a normal error of standard deviation ``step_sd`` (pp): ``P(|N(0, step_sd)| < PLATEAU_PP)``,
    the gain being itself the difference of two readings."""
    return math.erf(PLATEAU_PP / (step_sd * math.sqrt(2))) if step_sd > 0 else 1.0


@dataclass(frozen=True)
class Collapse:
    """A bit-width whose test accuracy rose well above chance and ended near it: a training that
    diverged, not one that is slow (in %)."""

    bits: int
    best: float
    best_epoch: int
    last: float
    fell_at: int  # the first epoch after the best one within the margin of chance
    before: int  # the last epoch evaluated before it


def collapses(run_or_rows, chance: float, margin: float = 10.0) -> list[Collapse]:
    """The bit-widths of a run that ended within ``margin`` pp of ``chance`` (in %) after having been
    more than twice the margin above it."""
    curve = _curve(run_or_rows)
    out = []
    epochs = sorted(curve)
    for bits in sorted({b for accs in curve.values() for b in accs}):
        accs = {e: 100.0 * curve[e][bits] for e in epochs if bits in curve[e]}
        best_epoch = max(accs, key=accs.get)
        last = accs[max(accs)]
        if last <= chance + margin and accs[best_epoch] > chance + 2 * margin:
            after = [e for e in accs if e > best_epoch]
            fell = next(e for e in after if accs[e] <= chance + margin)
            out.append(Collapse(bits, accs[best_epoch], best_epoch, last, fell, max(e for e in accs if e < fell)))
    return out


@dataclass(frozen=True)
class Doubled:
    """A comparison ``a - b`` at one bit-width, trained at some length and at twice it (the scale study's
    verdict checks), judged by the book's doubling rule: at a bit-width where its methods are still learning
    by the last-quarter gain, a comparison is a verdict when its methods are at a plateau at their highest
    bit-width at both lengths and it reads the same at both under the chapter's own test
    (:meth:`emq.analysis.stats.Difference.reading`: the same method clearly ahead, or no clear difference at
    either; within the match margin at both, or outside it at both). The verdict is the longer length's.

    Under a cosine schedule a low bit-width gains most as the learning rate falls, so its last-quarter gain
    need not shrink with longer training; whether a comparison changes when the training is doubled is what
    "a verdict that longer training could change" asks directly."""

    short: Difference
    long: Difference
    flat: bool  # every method of the comparison at a plateau at its highest bit-width, at both lengths
    test: str = "order"

    @property
    def held(self) -> bool:
        """The comparison reads the same at both lengths."""
        return self.short.reading(self.test) == self.long.reading(self.test)

    @property
    def is_verdict(self) -> bool:
        return self.flat and self.held

    def describe(self, lengths: tuple[int, int]) -> str:
        """``"at 96 epochs +1.33 ± 0.24 pp (s.e.), ahead; at 192 +0.55 ± 0.31 pp (s.e.), no clear difference:
        changed"``."""
        (s, lo), (e_s, e_lo) = (self.short, self.long), lengths
        return (f"at {e_s} epochs {s.describe()}, {s.reading(self.test)}; at {e_lo} {lo.describe()}, "
                f"{lo.reading(self.test)}: " + ("held" if self.held else "changed"))


def runs_at(runs: Mapping[tuple, object], *key) -> list:
    """The runs of ``runs`` (keyed ``(method, length, seed)``, say) whose key starts with ``key``: one method's
    seeds at one length."""
    return [run for k, run in runs.items() if k[:len(key)] == key]


def doubling_check(runs: Mapping[tuple[str, int, int], object], acc: pd.DataFrame, methods: tuple[str, str],
                   lengths: tuple[int, int], test: str = "order") -> dict[int, Doubled]:
    """A comparison ``a - b`` (``methods``) at two lengths, per bit-width, by the doubling rule (:class:`Doubled`).

    ``runs`` maps ``(method, epochs, seed)`` to a run, ``acc`` holds their test accuracies (fractions) in
    columns ``method``, ``epochs``, ``seed``, ``bits``, ``acc``; each side of a difference is the
    method's seeds at that length, in the order of ``acc``."""
    a, b = methods
    flat = all(Plateau({m: runs_at(runs, m, e) for m in methods}).at_plateau for e in lengths)
    out = {}
    for bits in sorted(acc.bits.unique()):
        d = [difference(select(acc, method=a, epochs=e, bits=bits), select(acc, method=b, epochs=e, bits=bits))
             for e in lengths]
        out[int(bits)] = Doubled(d[0], d[1], flat, test)
    return out


def number_key(label: str) -> str:
    """A method's label as a JSON key: ``"shared_meanvar, trained on all"`` -> ``shared_meanvar_trained_on_all``."""
    return re.sub(r"\W+", "_", label).strip("_")


class Plateau:
    """The last-quarter gains of every method a chapter compares, and what they allow it to say.

    ``groups`` maps a method's label to its runs (one per seed); the gains are read at ``bits``
    (default: each method's highest trained bit-width, the book's rule). A comparison at a lower
    bit-width is judged at its own bit-width as well (:meth:`over`).
    """

    def __init__(self, groups: Mapping[str, Iterable], bits: int | None = None):
        self.groups = {label: list(runs) for label, runs in groups.items()}
        self.methods = {label: method_gains(runs, bits) for label, runs in self.groups.items()}
        if not self.methods:
            raise ValueError("Plateau needs at least one method")

    def of(self, *labels: str) -> Plateau:
        """The same gains for the methods ``labels`` only: the runs one comparison reads, which may be
        at a plateau while another method of the chapter is not."""
        missing = [label for label in labels if label not in self.methods]
        if missing:
            raise KeyError(f"no runs of {', '.join(missing)}: the methods are {', '.join(self.methods)}")
        part = copy.copy(self)
        part.methods = {label: self.methods[label] for label in labels}
        part.groups = {label: self.groups[label] for label in labels}
        return part

    def at(self, bits: int) -> Plateau:
        """The same methods' gains at ``bits``: a comparison at a bit-width below the highest is a verdict
        only where its methods are flat there too, since a low bit-width can still rise while the highest
        is flat (chapter 00's verdict check)."""
        return Plateau(self.groups, bits)

    def over(self, bits: Iterable[int]) -> Plateau:
        """The rule for a comparison at ``bits``: these methods' gains as read so far (the highest bit-width)
        and, for every one of ``bits`` below that a method was tested at, its gains there as a method of its
        own (``"lsq at 2 bits"``), so that :attr:`at_plateau`, :attr:`bound`, :meth:`why` and :meth:`flags`
        judge all of them."""
        part = copy.copy(self)
        part.methods = dict(self.methods)
        for label, runs in self.groups.items():
            curve = _curve(runs[0])
            tested = set(curve[max(curve)])
            for b in bits:
                if b in tested and b != self.methods[label].bits:
                    part.methods[f"{label} at {b} bits"] = method_gains(runs, b)
        return part

    @property
    def largest(self) -> float:
        """The mean last-quarter gain (signed, pp) of the method furthest from flat (largest
        :attr:`Gains.bound`)."""
        return max(self.methods.values(), key=lambda g: g.bound).mean

    @property
    def bound(self) -> float:
        """The largest ``|mean gain| + s.e.`` among the methods, in percentage points: below
        :data:`PLATEAU_PP`, every method is at a plateau."""
        return max(g.bound for g in self.methods.values())

    @property
    def at_plateau(self) -> bool:
        """Whether every method's mean gain is within :data:`PLATEAU_PP` of zero by more than its s.e."""
        return all(g.at_plateau for g in self.methods.values())

    def learning(self) -> list[str]:
        """The methods still learning (or unstable): ``|mean gain| + s.e.`` of 0.5 pp or more."""
        return [label for label, g in self.methods.items() if not g.at_plateau]

    def why(self) -> str:
        """The method furthest from flat and its gain: ``"shared: 1.93 ± 1.23 pp over the last quarter,
        |mean| + s.e. 3.16 pp"``."""
        label, g = max(self.methods.items(), key=lambda item: item[1].bound)
        return f"{label}: {g.describe()} pp over the last quarter, |mean| + s.e. {g.bound:.2f} pp"

    def table(self) -> pd.DataFrame:
        """One row per method: its runs, the bit-width read, the last quarter's epochs, the gain as
        mean ± s.e. over seeds, |mean| + s.e. (what the rule reads), the largest gain of a run, and the
        largest swing of a run (highest minus lowest accuracy evaluated in its last quarter), in
        percentage points."""
        rows = []
        for label, g in self.methods.items():
            ref = reference_epoch(g.epochs)
            rows.append({"method": label, "runs": len(g.gains), "bits": g.bits,
                         "last quarter (epochs)": f"{ref or 'start'} → {g.epochs}",
                         "gain (pp), mean ± s.e.": g.describe(),
                         "|mean| + s.e. (pp)": f"{g.bound:.2f}",
                         "largest gain of a run (pp)": f"{g.largest:+.2f}",
                         "largest swing (pp)": f"{max(g.swings):.2f}" if g.swings else "",
                         "still learning": "yes" if not g.at_plateau else "no"})
        return pd.DataFrame(rows)

    def show(self, caption: str = "gain of test accuracy (pp) over the last quarter of training"):
        """:meth:`table` as an HTML table in its own scroll box (:func:`emq.book.plots.show_table`)."""
        return show_table(self.table(), caption=caption, index=False)

    def numbers(self) -> dict[str, float]:
        """What a chapter records: ``at_plateau`` (1.0 / 0.0), ``max_last_quarter_gain_pp`` (the largest
        ``|mean gain| + s.e.`` among the methods: :attr:`bound`) and every method's mean gain,
        ``last_quarter_gain_pp_<method>``."""
        out = self.flags()
        out.update({f"last_quarter_gain_pp_{number_key(label)}": g.mean for label, g in self.methods.items()})
        return out

    def flags(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}at_plateau`` (1.0 / 0.0) and ``{prefix}max_last_quarter_gain_pp`` (:attr:`bound`): what a
        chapter records for the whole of it (no prefix) or for one comparison (``plateau.of(...).flags("claim1_")``)."""
        return {f"{prefix}at_plateau": float(self.at_plateau), f"{prefix}max_last_quarter_gain_pp": self.bound}

    def status(self) -> str:
        """One sentence (Markdown) on whether the chapter's comparisons are verdicts."""
        runs = sum(len(g.gains) for g in self.methods.values())
        if self.at_plateau:
            who, what = (("The run is", f"its gain of test accuracy over the last quarter of training is "
                          f"{self.largest:+.2f} pp, within {PLATEAU_PP} pp of zero") if runs == 1 else
                         (f"All {len(self.methods)} methods ({runs} runs) are",
                          "every method's mean gain of test accuracy over the last quarter of training is within "
                          f"{PLATEAU_PP} pp of zero by more than its standard error (|mean| + s.e. at most "
                          f"{self.bound:.2f} pp)"))
            return (f"**{who} at a plateau**: at the highest trained bit-width, {what}, so the comparisons below are "
                    "verdicts at a plateau. The rule reads the last quarter of the schedule only; whether a "
                    "schedule twice as long would change a comparison is measured where the scale study (chapter 00) "
                    "trains one.")
        learning = "; ".join(f"{label} {self.methods[label].describe()} pp" for label in self.learning())
        return (f"**The networks are still learning**: for {len(self.learning())} of {len(self.methods)} methods, the "
                "mean change of test accuracy at the highest trained bit-width over the last quarter of training is "
                f"not within {PLATEAU_PP} pp of zero by more than its standard error ({learning}). The comparisons "
                "below that involve these methods describe their runs; they are not verdicts on the methods, which "
                "longer training could change. Where a run's swing (highest minus lowest accuracy evaluated in its "
                "last quarter) is large, its readings scatter that much, and more seeds or readings are needed to "
                "see a 0.5 pp trend through them.")

    def lead(self) -> str:
        """The words before a list of outcomes: a verdict at a plateau, or what still-learning runs show."""
        if self.at_plateau:
            return "**Verdict, at a plateau:**"
        return (f"**Not a verdict** (the networks are still learning: a mean gain of {self.largest:+.1f} pp over "
                "the last quarter of training); these runs show:")

    def verdict(self, outcome: str) -> str:
        """A verdict's headline: ``**Supported**, at a plateau`` when every method is at a plateau,
        else the outcome these still-learning runs show, marked as no verdict."""
        if self.at_plateau:
            return f"**{outcome}**, at a plateau"
        return (f"**Not a verdict** (still learning: a mean gain of {self.largest:+.1f} pp over the last quarter); "
                f"these runs show: *{outcome[:1].lower() + outcome[1:]}*")
