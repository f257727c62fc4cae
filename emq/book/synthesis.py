"""What the book finds, drawn together from the chapters' JSON (``results/chapters/<chapter>.json``).

Each chapter records its headline numbers and whether its networks stopped learning
(:mod:`emq.book.plateau`). :func:`findings` turns those numbers into one line per claim: what was
claimed, whether the runs support it, the numbers that say so, and whether that is a verdict (every
run of the chapter at a plateau) or only what networks still learning show. The synthesis chapter
prints them, so that it changes when a chapter is re-executed.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emq.analysis.stats import Difference
from emq.book.grids import CHAPTER_GRIDS, VERDICT_TESTS, grid_configs, grid_of, side_ratio
from emq.config import load_config
from emq.results import read_json

CHAPTER_TITLES = {
    "01_quantization_bias": "1. Quantization bias",
    "02_shared_bn": "2. Shared BatchNorm",
    "03_knowledge_transfer": "3. Knowledge transfer",
    "04_coreset_pruning": "4. Bit-wise coresets",
    "05_full_scale": "5. Full scale",
    "06_methods": "6. The methods side by side",
}


@dataclass(frozen=True)
class Finding:
    """One claim of a chapter and what its runs say about it."""

    chapter: str
    claim: str
    supported: bool | None  # None: a measurement, not a yes/no claim
    evidence: str  # the numbers behind it, as the chapter recorded them
    at_plateau: bool | None = None  # the runs behind this claim stopped learning; None: as its whole chapter

    def is_verdict(self, chapter: ChapterState) -> bool:
        """A verdict when the runs it compares stopped learning: its own flag where the chapter
        recorded one for this comparison, else the chapter's."""
        return bool(chapter.at_plateau if self.at_plateau is None else self.at_plateau)


@dataclass(frozen=True)
class ChapterState:
    """Whether a chapter's networks stopped learning, and at what scale it ran."""

    chapter: str
    at_plateau: bool | None  # None: the chapter trains nothing it compares (a runbook)
    largest_gain_pp: float | None  # the largest |mean last-quarter gain| + s.e. of its methods (32 bits), pp
    scale: str

    @property
    def status(self) -> str:
        if self.at_plateau is None:
            return "no verdicts (runbook)"
        if self.at_plateau:
            return "verdicts"
        return f"still learning (|mean gain| + s.e. up to {self.largest_gain_pp:.1f} pp)"


def _yes(numbers: dict, key: str) -> bool:
    return numbers[key] == 1.0


def _flag(numbers: dict, key: str) -> bool | None:
    """A recorded 1.0 / 0.0 flag as a bool; None where the chapter did not record it."""
    return None if key not in numbers else numbers[key] == 1.0


def _bias(n: dict) -> list[Finding]:
    none, mv = n["shift_2bit_none"], n["shift_2bit_meanvar"]
    return [Finding("01_quantization_bias", "the mean+var correction removes the pre-activation shift that 2-bit "
                    "quantization adds", None,
                    f"shift at 2 bits {none:.3f} without correction, {mv:.3f} with mean+var "
                    f"({none / mv:.1f}x smaller)" if mv else f"shift at 2 bits {none:.3f}, 0 with mean+var")]


def _bn(n: dict) -> list[Finding]:
    ch = "02_shared_bn"
    # the corrections the chapter compared (the mean-only one is in its grid's extended tier)
    corrections = {m: label for m, label in (("shared_mean", "mean"), ("shared_meanvar", "mean+var"))
                   if f"claim2_{m}_worst_pp" in n}
    out = [
        Finding(ch, "shared BN without correction loses accuracy at 2 bits", _yes(n, "claim1_supported"),
                f"shared − switchable at 2 bits: {n['claim1_diff_pp']:+.1f} pp", _flag(n, "claim1_at_plateau")),
        Finding(ch, f"shared BN with a correction matches switchable BN within ±{n['match_margin']:.1f} pp",
                any(_flag(n, f"claim2_{m}_supported") for m in corrections),
                "worst gap to switchable: " + ", ".join(f"{label} {n[f'claim2_{m}_worst_pp']:+.1f} pp"
                                                        for m, label in corrections.items()),
                _flag(n, "claim2_at_plateau")),
        Finding(ch, "untrained bit-widths match their trained neighbours zero-shot", _yes(n, "claim3_supported"),
                "zero-shot − interpolated neighbours: " + ", ".join(
                    f"{b} bits {n[f'claim3_{b}bit_zeroshot_vs_neighbours_pp']:+.1f} pp" for b in (3, 5, 6, 7)),
                _flag(n, "claim3_at_plateau")),
    ]
    low = min(int(k.split("_")[2][:-3]) for k in n if k.startswith("acc_switchable_") and k.endswith("zeroshot_mean"))
    recal = n[f"acc_shared_{low}bit_recal_mean"]
    corrected = n[f"acc_shared_meanvar_{low}bit_zeroshot_mean"]
    out.append(Finding(ch, f"re-estimating shared BN's statistics (no correction) does what the correction does, "
                       f"at {low} bits", None,
                       f"shared BN re-estimated {100 * recal:.1f} %, shared BN + mean+var zero-shot "
                       f"{100 * corrected:.1f} % ({100 * (recal - corrected):+.1f} pp)"))
    return out


def _transfer(n: dict) -> list[Finding]:
    return [Finding("03_knowledge_transfer", f"a {b}-bit child probes the other child's data better with shared "
                    "weights than alone", _yes(n, f"transfer_{b}bit_supported"),
                    f"shared − alone on the other child's data: {n[f'transfer_{b}bit_other_pp']:+.1f} pp")
            for b in (2, 32)]


def _pruning(n: dict) -> list[Finding]:
    ch = "04_coreset_pruning"
    found = [m.groups() for m in map(_PRUNED.match, n) if m and m.group(1) != "full_data"]
    ratios = {p: [s for s, q in found if q == p] for _, p in found}
    side = str(round(100 * side_ratio([int(p) / 100 for p in ratios])))  # the chapter's own side ratio
    at_2 = {s: n[f"acc_{s}_p{side}_2bit_mean"] for s in ratios[side]}
    best = max(at_2, key=at_2.get)
    out = [Finding(ch, f"{_label(s)} selection keeps every bit-width within 1 pp of the full data "
                   "at some pruning ratio", n[f"{s}_max_prune_1pp"] > 0,
                   f"largest such ratio {n[f'{s}_max_prune_1pp']:.1f}, cost ratio there "
                   f"{n[f'{s}_cost_ratio_at_max_1pp']:.2f}x" if n[f"{s}_max_prune_1pp"] > 0 else
                   "none of the ratios tried") for s in ("el2n_static", "random_static")]
    out.append(Finding(ch, f"a data score beats random selection at p = {int(side) / 100} (2 bits)",
                       best != "random_static",
                       "2-bit accuracy, best first: " + ", ".join(
                           f"{_label(s)} {100 * at_2[s]:.1f} %" for s in sorted(at_2, key=at_2.get, reverse=True))))
    if "separate_over_joint_passes" in n:
        out.append(Finding(ch, "one multi-bit network trains cheaper than one network per bit-width", 
                           n["separate_over_joint_passes"] > 1.0,
                           f"the separate networks cost {n['separate_over_joint_passes']:.2f}x the joint network's "
                           f"sample-passes and {n['separate_over_el2n_passes']:.2f}x static EL2N's; joint − separate "
                           f"{n['joint_vs_separate_worst_pp']:+.1f} pp at the worst bit-width"))
    if "joint_recal_vs_separate_worst_pp" in n:
        out.append(Finding(ch, "one multi-bit network, its BatchNorm statistics re-estimated per bit-width, is within "
                           "1 pp of one network per bit-width at every bit-width",
                           n["joint_recal_vs_separate_worst_pp"] >= -1.0,
                           f"joint (re-estimated) − separate {n['joint_recal_vs_separate_worst_pp']:+.1f} pp at the "
                           "worst bit-width", _flag(n, "per_bit_at_plateau")))
    redundancy = f"random_static_worst_pp_p{side}"
    if redundancy in n:
        out.append(Finding(ch, f"the data is redundant: a random {100 - int(side)} % of it keeps every bit-width "
                           "within 1 pp of all of it", n[redundancy] >= -1.0,
                           f"random, static at p = {int(side) / 100}: {n[redundancy]:+.1f} pp at the worst bit-width",
                           _flag(n, "redundancy_at_plateau")))
    out.append(Finding(ch, "the cost ratio p = 0.6 can reach against the joint full-data baseline", None,
                       f"at most {n['pruning_ceiling_p60']:.2f}x with its warm-up, "
                       f"{n['pruning_ceiling_no_warmup_p60']:.2f}x without"))
    return out


_PRUNED = re.compile(r"^acc_(.+)_p(\d+)_2bit_mean$")


def _label(score_mode: str) -> str:
    """``grand_last_static`` -> ``grand_last, static``: a score and its mode, as chapter 04 names them."""
    score, mode = score_mode.rsplit("_", 1)
    return f"{score}, {mode}"


def _full_scale(n: dict) -> list[Finding]:
    return [Finding("05_full_scale", "what one full-scale run costs (estimated, not trained here)", None,
                    f"{n['est_macs_g']:.2f} GMACs per image, {n['est_total_h']:.1f} h in all, "
                    f"{n['est_mem_fp32_gib']:.1f} GiB per GPU in fp32")]


def _methods(n: dict) -> list[Finding]:
    names = sorted(k[:-len("_acc_2")] for k in n if k.endswith("_acc_2") and not k.startswith("best"))
    ranked = sorted(names, key=lambda m: -n[f"{m}_acc_2"])
    out = [Finding("06_methods", "EMQ is the most accurate multi-bit method at 2 bits", ranked[0] == "emq",
                   f"EMQ {n['emq_acc_2']:.1f} %, rank {ranked.index('emq') + 1} of {len(ranked)}; best "
                   f"{ranked[0]} {n[f'{ranked[0]}_acc_2']:.1f} %; full precision alone "
                   f"{n['full_precision_acc_32']:.1f} % at 32 bits")]
    low = min((int(m.group(1)) for m in map(_BEST.match, n) if m), default=None)  # the lowest judged bit-width
    if low is not None and (f := _against_baseline(n, names, low)):
        out.append(f)
    out += [Finding("06_methods", f"`{m}` trains without diverging at this scale", False,
                    f"{n[f'{m}_diverged_runs']:.0f} of its runs ended near chance at some bit-width after rising "
                    "well above it")
            for m in names if n.get(f"{m}_diverged_runs", 0) > 0]
    return out


_BEST = re.compile(r"^best_(\d+)bit_at_plateau$")
_DOUBLED = re.compile(r"^(\w*verdict)_(.+)_vs_(.+)_(\d+)bit_pp_(\d+)$")


def doubled_verdicts(scale: dict, group: str | None = None) -> list[str]:
    """The chapters' comparisons that the scale study trained for twice the epochs as well (its numbers,
    ``scale``; one of its grid's ``group`` only: ``"verdict"``, chapter 06's; ``"bn_verdict"``, chapter
    02's), judged by the doubling rule (:class:`emq.book.plateau.Doubled`): one line per comparison and
    bit-width, with the difference at both lengths, whether it read the same at both under its chapter's
    test, and whether that makes it a verdict."""
    found: dict[tuple[str, str, str, int], dict[int, tuple[float, float]]] = {}
    for key, value in scale.items():
        if (m := _DOUBLED.match(key)) and group in (None, m[1]):
            g, a, b, bits, epochs = m[1], m[2], m[3], int(m[4]), int(m[5])
            se = scale[f"{g}_{a}_vs_{b}_{bits}bit_se_pp_{epochs}"]
            found.setdefault((g, a, b, bits), {})[epochs] = (value, se)
    lines = []
    for (g, a, b, bits), at in sorted(found.items(), key=lambda t: (t[0][0] != "bn_verdict", t[0][3])):
        held, verdict = scale.get(f"{g}_{bits}bit_held"), scale.get(f"{g}_{bits}bit_doubled_verdict")
        if held is None or verdict is None or len(at) < 2:
            continue
        short, long = sorted(at)
        d = [_difference(*at[short]), _difference(*at[long])]
        read = [x.reading(VERDICT_TESTS[g]) for x in d]
        lines.append(f"{a} − {b} at {bits} bits: {d[0].describe()} at {short} epochs, {d[1].describe()} at {long}: "
                     + (f"{read[1]} at both" if held == 1.0 else f"{read[0]}, then {read[1]}")
                     + (", a verdict" if verdict == 1.0 else
                        " (not a verdict: a method still learning at its highest bit-width)" if held == 1.0 else
                        ": changed, not a verdict"))
    return lines


def _difference(diff_pp: float, se_pp: float) -> Difference:
    """A recorded difference and its standard error; a standard error of 0 is one seed on a side
    (:func:`emq.analysis.stats.difference`)."""
    n = 1 if se_pp == 0 else 2
    return Difference(diff_pp, se_pp, n, n)


def read_scale(results: str | Path) -> dict:
    """The scale study's numbers from the store at ``results`` ({} before it is executed)."""
    f = Path(results) / "chapters" / "00_scale.json"
    return read_json(f) if f.is_file() else {}


def _against_baseline(n: dict, names: list[str], bits: int) -> Finding | None:
    """Whether the most accurate method at ``bits`` is ahead of the Any-Precision baseline by more than
    twice the standard error, judged on the runs of that line of chapter 06."""
    claim = f"a related method is clearly more accurate than the Any-Precision baseline at {bits} bits"
    best = max(names, key=lambda m: n[f"{m}_acc_{bits}"])
    at_plateau = _flag(n, f"best_{bits}bit_at_plateau")
    if best == "any_precision":
        return Finding("06_methods", claim, False,
                       f"the baseline is the most accurate, {n[f'{best}_acc_{bits}']:.1f} %", at_plateau)
    if f"{best}_vs_any_precision_{bits}bit_pp" not in n:
        return None
    d, se = n[f"{best}_vs_any_precision_{bits}bit_pp"], n[f"{best}_vs_any_precision_{bits}bit_se_pp"]
    clear = se > 0 and d > 2 * se
    return Finding("06_methods", claim, clear, f"the most accurate, {best}, − any_precision: {d:+.2f} ± {se:.2f} pp "
                   "(s.e.), " + ("more than twice its standard error" if clear else "not twice its standard error"),
                   at_plateau)


CLAIMS: dict[str, Callable[[dict], list[Finding]]] = {
    "01_quantization_bias": _bias,
    "02_shared_bn": _bn,
    "03_knowledge_transfer": _transfer,
    "04_coreset_pruning": _pruning,
    "05_full_scale": _full_scale,
    "06_methods": _methods,
}


def read_numbers(results: str | Path) -> dict[str, dict]:
    """Every chapter's numbers from the store at ``results`` (chapters not executed are left out)."""
    folder = Path(results) / "chapters"
    return {ch: read_json(folder / f"{ch}.json") for ch in CLAIMS if (folder / f"{ch}.json").is_file()}


def findings(numbers: dict[str, dict]) -> list[Finding]:
    """One :class:`Finding` per claim of every chapter in ``numbers`` (chapter -> its JSON)."""
    return [f for ch, n in numbers.items() for f in CLAIMS[ch](n)]


def scale_of(chapter: str, profile: str) -> str:
    """The scale a chapter's runs have at ``profile``: network, images, epochs, seeds."""
    if chapter not in CHAPTER_GRIDS:
        return "runbook: see the chapter"
    base = grid_of(chapter, profile).base(load_config(profile=profile))
    seeds = sorted({c.train.seed for c in grid_configs(chapter, profile)})
    images = f"{base.data.train_size:,}" if base.data.train_size else "all"
    return (f"{base.model.arch}-{base.model.depth} x{base.model.width}, {images} images, "
            f"{base.train.epochs} epochs, {len(seeds)} seed{'s' * (len(seeds) > 1)}")


def chapter_states(numbers: dict[str, dict], profile: str) -> list[ChapterState]:
    out = []
    for ch, n in numbers.items():
        flag = n.get("at_plateau")
        out.append(ChapterState(ch, None if flag is None else flag == 1.0, n.get("max_last_quarter_gain_pp"),
                                scale_of(ch, profile)))
    return out
