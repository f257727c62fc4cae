"""A verdict is a verdict only at a plateau: the last-quarter gain of a run is read from its
per-epoch metrics by a stated rule, and no committed chapter calls a comparison one "at a
plateau" while a run behind it was still learning."""
import json
import math
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from emq.analysis.stats import Difference
from emq.book.plateau import (
    PLATEAU_PP,
    Doubled,
    Plateau,
    chance_of_passing,
    collapses,
    doubling_check,
    last_quarter_gain,
    late_steps,
    method_gains,
    number_key,
    reference_epoch,
    two_reading_gain,
)

ROOT = Path(__file__).resolve().parents[1]
# The chapters that compare methods. Chapter 00 (the scale study) measures where the plateau is:
# its outputs say which of its runs reach one, by design, and it compares no methods.
CHAPTERS = sorted(p for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb") if not p.name.startswith("00_"))
# Chapter 05 is a runbook whose runs are not meant for verdicts: it records no plateau flag.
RUNBOOKS = {"05_full_scale"}
PHRASE = re.compile(r"at a plateau", re.I)


def rows(curve: dict[int, float], bits: int = 32, **other_bits) -> list[dict]:
    """Metric rows of a run whose ``bits``-bit test accuracy per epoch is ``curve`` (in %)."""
    out = []
    for epoch, acc in curve.items():
        test_acc = {str(bits): acc / 100, **{str(b): v[epoch] / 100 for b, v in other_bits.items()}}
        out.append({"epoch": epoch, "step": 10 * epoch, "test_acc": test_acc, "loss": {str(bits): 1.0}})
    return out


class FakeRun:
    def __init__(self, metric_rows):
        self._rows = metric_rows

    def metrics(self):
        return self._rows


@pytest.mark.parametrize("epochs, ref", [(1, 0), (2, 1), (3, 2), (4, 3), (8, 6), (16, 12), (60, 45), (61, 45)])
def test_the_last_quarter_starts_at_three_quarters_of_the_epochs_and_at_least_one_before_the_end(epochs, ref):
    assert reference_epoch(epochs) == ref


def test_the_gain_is_the_last_epoch_minus_the_epoch_at_three_quarters_in_percentage_points():
    curve = {e: 50 + e for e in range(1, 17)}  # one point per epoch
    assert last_quarter_gain(rows(curve)) == pytest.approx(4.0)  # epoch 16 - epoch 12
    assert last_quarter_gain(rows({1: 60.0, 2: 70.0, 3: 75.0, 4: 75.25})) == pytest.approx(0.25)


def test_the_gain_is_read_at_the_highest_bit_width_unless_told():
    r = rows({1: 60.0, 2: 70.0, 3: 75.0, 4: 76.0}, bits=32, **{"2": {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0}})
    assert last_quarter_gain(r) == pytest.approx(1.0)
    assert last_quarter_gain(r, bits=2) == pytest.approx(10.0)
    assert last_quarter_gain(rows({1: 30.0, 2: 40.0}, bits=2)) == pytest.approx(10.0)  # a 2-bit-only run


def test_other_metric_rows_are_ignored_and_a_drop_is_a_negative_gain():
    r = rows({1: 60.0, 2: 70.0, 3: 75.0, 4: 73.0}) + [{"step": 99, "eval": "recal"}]
    assert last_quarter_gain(r) == pytest.approx(-2.0)
    assert last_quarter_gain(FakeRun(r)) == pytest.approx(-2.0)


def test_a_one_epoch_run_counts_all_it_learned_and_is_never_at_a_plateau():
    assert last_quarter_gain(rows({1: 40.0})) == pytest.approx(40.0)
    assert not Plateau({"smoke": [FakeRun(rows({1: 40.0}))]}).at_plateau


def test_a_run_without_metrics_or_with_a_missing_epoch_is_an_error_not_a_number():
    with pytest.raises(ValueError, match="no per-epoch test accuracy"):
        last_quarter_gain([])
    with pytest.raises(ValueError, match="no epoch 3"):
        last_quarter_gain(rows({1: 50.0, 2: 60.0, 4: 70.0}))


def test_a_method_over_seeds_gives_the_mean_and_standard_error_of_its_gains():
    g = method_gains([FakeRun(rows({1: 50.0, 2: 60.0, 3: 70.0, 4: 71.0})),
                      FakeRun(rows({1: 50.0, 2: 60.0, 3: 70.0, 4: 73.0}))])
    assert g.gains == pytest.approx((1.0, 3.0)) and g.mean == pytest.approx(2.0) and g.largest == pytest.approx(3.0)
    assert g.bits == 32 and g.epochs == 4
    assert g.describe() == "2.00 ± 1.00"  # std 1.41, s.e. 1.00
    assert method_gains([FakeRun(rows({1: 50.0, 2: 50.2}))]).describe() == "0.20 (1 seed)"


def test_the_gain_is_the_line_through_every_reading_of_the_last_quarter_not_its_two_ends():
    zigzag = rows({8: 60.0, 36: 80.0, 40: 81.0, 44: 80.0, 48: 81.0})  # the last quarter of 48 epochs: 36-48
    assert two_reading_gain(zigzag) == pytest.approx(1.0)  # one reading at each end
    assert last_quarter_gain(zigzag) == pytest.approx(0.05 * 12)  # slope 0.05 pp/epoch over 12 epochs
    # a straight line is read the same either way
    straight = rows({e: 70 + 0.1 * e for e in (8, 36, 40, 44, 48)})
    assert last_quarter_gain(straight) == pytest.approx(two_reading_gain(straight)) == pytest.approx(1.2)


def test_a_method_is_at_a_plateau_when_its_mean_gain_over_seeds_is_under_half_a_point_by_more_than_its_se():
    def run(gain):
        return FakeRun(rows({1: 70.0, 2: 80.0, 3: 84.0, 4: 84.0 + gain}))

    assert PLATEAU_PP == 0.5
    flat = Plateau({"a": [run(0.4), run(0.4)], "b": [run(0.4)]})
    assert flat.at_plateau and flat.learning() == [] and flat.bound == pytest.approx(0.4)
    edge = Plateau({"a": [run(0.4), run(0.5)], "b": [run(0.4)]})  # 0.45 + s.e. 0.05 = 0.5: not under it
    assert not edge.at_plateau and edge.learning() == ["a"]
    assert edge.bound == pytest.approx(0.5) and edge.largest == pytest.approx(0.45)
    assert Plateau({"a": [run(0.3), run(0.2), run(0.1)]}).at_plateau  # 0.2 + 0.06
    # seeds that scatter: a mean of 0 that cannot be read at 0.5 pp (s.e. 0.52)
    scatter = Plateau({"a": [run(0.9), run(-0.9), run(0.0)]})
    assert scatter.methods["a"].mean == pytest.approx(0.0) and not scatter.at_plateau
    # and one run alone: its gain under 0.5 pp either way
    assert Plateau({"a": [run(-0.4)]}).at_plateau and not Plateau({"a": [run(0.5)]}).at_plateau


def test_a_comparison_is_judged_on_its_own_runs_whatever_the_other_methods_of_the_chapter_do():
    flat = FakeRun(rows({1: 70.0, 2: 80.0, 3: 84.0, 4: 84.2}))
    learning = FakeRun(rows({1: 40.0, 2: 50.0, 3: 60.0, 4: 65.0}))
    chapter = Plateau({"a": [flat, flat], "b": [flat], "c": [learning]})
    assert not chapter.at_plateau
    assert chapter.of("a", "b").at_plateau and PHRASE.search(chapter.of("a", "b").verdict("Supported"))
    assert not chapter.of("a", "c").at_plateau and chapter.of("a", "c").largest == pytest.approx(5.0)
    assert chapter.of("a", "b").flags("claim1_") == pytest.approx({"claim1_at_plateau": 1.0,
                                                                  "claim1_max_last_quarter_gain_pp": 0.2})
    with pytest.raises(KeyError, match="no runs of d"):
        chapter.of("a", "d")


def test_what_a_chapter_records_and_says_follows_the_rule():
    flat = FakeRun(rows({1: 70.0, 2: 80.0, 3: 84.0, 4: 84.1}))
    learning = FakeRun(rows({1: 40.0, 2: 50.0, 3: 60.0, 4: 65.0}))
    yes, no = Plateau({"shared_meanvar, trained on all": [flat]}), Plateau({"emq": [flat], "lsq": [learning]})
    assert yes.numbers() == pytest.approx({"at_plateau": 1.0, "max_last_quarter_gain_pp": 0.1,
                                           "last_quarter_gain_pp_shared_meanvar_trained_on_all": 0.1})
    assert no.numbers()["at_plateau"] == 0.0 and no.numbers()["max_last_quarter_gain_pp"] == pytest.approx(5.0)
    assert PHRASE.search(yes.status()) and PHRASE.search(yes.verdict("Supported"))
    assert "still learning" in no.status() and "not verdicts" in no.status()
    assert not PHRASE.search(no.status()) and not PHRASE.search(no.verdict("Supported"))
    assert "Not a verdict" in no.verdict("Supported") and "*supported*" in no.verdict("Supported")
    assert PHRASE.search(yes.lead()) and not PHRASE.search(no.lead()) and "still learning" in no.lead()
    table = no.table()
    assert list(table["method"]) == ["emq", "lsq"] and list(table["still learning"]) == ["no", "yes"]
    assert list(table["last quarter (epochs)"]) == ["3 → 4", "3 → 4"]
    assert "<table" in no.show().data and "emq-scroll" in no.show().data
    assert number_key("el2n, static") == "el2n_static"


# ---- the committed chapters --------------------------------------------------------------------
def output_texts(nb) -> list[str]:
    """Every text a reader sees in the outputs of an executed notebook (glued values included)."""
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                texts.append(out["text"])
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/") or mime.endswith("text/plain"):
                    texts.append(value if isinstance(value, str) else "".join(value))
    return texts


def plateau_problems(nb, numbers: dict, runbook: bool = False) -> list[str]:
    """What is wrong with a chapter's plateau flag and what its outputs say, given its JSON numbers."""
    said = [t for t in output_texts(nb) if PHRASE.search(t)]
    if runbook:
        return [f"a runbook, whose runs are not meant for verdicts, says: {t[:200]!r}" for t in said]
    missing = {"at_plateau", "max_last_quarter_gain_pp"} - set(numbers)
    if missing:
        return [f"the chapter's JSON lacks {sorted(missing)}: re-execute the chapter"]
    # the chapter's flag, and the flags of single comparisons ("claim1_at_plateau"), each against its gain
    prefixes = [k[:-len("at_plateau")] for k in numbers if k.endswith("at_plateau")]
    for prefix in prefixes:
        largest, flag = numbers.get(f"{prefix}max_last_quarter_gain_pp"), numbers[f"{prefix}at_plateau"]
        if largest is None or not math.isfinite(largest):
            return [f"{prefix}max_last_quarter_gain_pp is {largest}"]
        if flag != float(largest < PLATEAU_PP):
            return [f"{prefix}at_plateau = {flag} but the largest last-quarter gain is {largest} pp"]
    if not any(numbers[f"{prefix}at_plateau"] == 1.0 for prefix in prefixes):
        largest = numbers["max_last_quarter_gain_pp"]
        return [f"says 'at a plateau' while a run gained {largest:.2f} pp over its last quarter: {t[:200]!r}"
                for t in said]
    return []


def notebook(*outputs) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=list(outputs))]
    return nb


def test_the_check_of_committed_chapters_catches_a_plateau_verdict_on_runs_still_learning():
    says = nbformat.v4.new_output("display_data", {"text/markdown": "**Supported**, at a plateau"})
    honest = nbformat.v4.new_output("stream", text="The networks are still learning: not a verdict")
    learning = {"at_plateau": 0.0, "max_last_quarter_gain_pp": 3.2}
    flat = {"at_plateau": 1.0, "max_last_quarter_gain_pp": 0.3}
    assert plateau_problems(notebook(honest), learning) == []
    assert plateau_problems(notebook(says), flat) == []
    assert "while a run gained 3.20 pp" in plateau_problems(notebook(honest, says), learning)[0]
    assert "at_plateau = 1.0" in plateau_problems(notebook(), {**learning, "at_plateau": 1.0})[0]
    assert "at_plateau = 0.0" in plateau_problems(notebook(), {**flat, "at_plateau": 0.0})[0]
    assert "lacks" in plateau_problems(notebook(), {})[0]
    # one comparison at a plateau in a chapter that is not: that comparison may say so, if its flag is right
    assert plateau_problems(notebook(honest, says), {**learning, "claim3_at_plateau": 1.0,
                                                     "claim3_max_last_quarter_gain_pp": 0.2}) == []
    assert "claim3_at_plateau = 1.0" in plateau_problems(notebook(says), {
        **learning, "claim3_at_plateau": 1.0, "claim3_max_last_quarter_gain_pp": 0.7})[0]
    assert "while a run gained" in plateau_problems(notebook(says), {
        **learning, "claim3_at_plateau": 0.0, "claim3_max_last_quarter_gain_pp": 0.7})[0]
    assert plateau_problems(notebook(honest), {}, runbook=True) == []
    assert "runbook" in plateau_problems(notebook(says), {}, runbook=True)[0]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_no_committed_chapter_calls_a_comparison_a_verdict_at_a_plateau_while_its_networks_still_learn(path):
    """The committed cpu chapter's outputs against its results/chapters/<chapter>.json."""
    nb = nbformat.read(path, as_version=4)
    numbers = json.loads((ROOT / "results" / "chapters" / f"{path.stem}.json").read_text())
    problems = plateau_problems(nb, numbers, runbook=path.stem in RUNBOOKS)
    assert not problems, f"{path.name}: " + "\n".join(problems)


def test_the_swing_is_how_far_the_accuracy_moved_within_the_last_quarter_whatever_its_gain():
    dipped = FakeRun(rows({1: 50.0, 2: 60.0, 3: 78.0, 4: 80.5, 5: 70.0, 6: 78.9, 7: 80.5, 8: 80.1}))
    g = method_gains([dipped])
    assert g.gains == pytest.approx((1.2,)) and g.swings == pytest.approx((1.6,))  # epochs 6-8; 5 is before
    assert Plateau({"a": [dipped]}).table()["largest swing (pp)"].tolist() == ["1.60"]


def test_a_run_whose_accuracy_fell_over_its_last_quarter_is_not_at_a_plateau():
    fell = Plateau({"a": [FakeRun(rows({1: 50.0, 2: 60.0, 3: 70.0, 4: 68.0}))]})
    assert fell.largest == pytest.approx(-2.0) and not fell.at_plateau
    assert fell.numbers()["max_last_quarter_gain_pp"] == pytest.approx(2.0)  # the size of the change


def test_a_bit_width_that_rose_and_ended_near_chance_is_a_collapse_and_a_slow_one_is_not():
    two = {1: 40.0, 2: 76.0, 3: 70.0, 4: 9.0, 5: 12.0, 6: 9.3}  # 10 classes: chance is 10 %
    slow = {1: 10.0, 2: 11.0, 3: 12.0, 4: 14.0, 5: 15.0, 6: 18.0}  # near chance all along: not diverged
    run = FakeRun(rows({e: 80.0 for e in two}, 32, **{"2": two, "4": slow}))
    (c,) = collapses(run, chance=10.0)
    assert (c.bits, c.best, c.best_epoch, c.before, c.fell_at, c.last) == (2, 76.0, 2, 3, 4, pytest.approx(9.3))


def test_late_steps_are_the_moves_between_readings_near_the_end_and_set_the_chance_of_passing_the_rule():
    run = FakeRun(rows({8: 70.0, 36: 80.0, 40: 80.6, 44: 80.1, 48: 80.5}))
    assert late_steps(run) == pytest.approx([-0.5, 0.4])  # the readings from epoch 40 = 5/6 of 48 on
    assert late_steps(run, start=0.75) == pytest.approx([0.6, -0.5, 0.4])
    assert chance_of_passing(0.0) == 1.0
    assert chance_of_passing(PLATEAU_PP) == pytest.approx(0.6827, abs=1e-4)  # within one standard deviation
    assert chance_of_passing(2.0) < chance_of_passing(1.0) < chance_of_passing(0.5)


def test_a_comparison_at_a_low_bit_width_needs_its_methods_flat_there_as_well_as_at_the_highest():
    # 32 bits flat in every seed, 2 bits still rising by 0.75 pp over the last quarter (epochs 9-12)
    def run(seed):
        return FakeRun([{"epoch": e, "test_acc": {"2": (70.0 + e / 4 + seed) / 100, "32": (80.0 + seed) / 100}}
                        for e in range(1, 13)])

    p = Plateau({"a": [run(0), run(1)], "b": [run(0), run(2)]})
    assert p.at_plateau and p.methods["a"].bits == 32
    low = p.at(2)
    assert not low.at_plateau and low.methods["a"].bits == 2 and low.methods["a"].mean == pytest.approx(0.75)
    assert p.of("a").at(2).methods.keys() == {"a"}
    judged = p.over([2, 32])  # a comparison at 2 and 32 bits: 32 bits as before, 2 bits as methods of their own
    assert judged.methods.keys() == {"a", "b", "a at 2 bits", "b at 2 bits"} and not judged.at_plateau
    assert judged.bound == pytest.approx(low.bound) and judged.why().split(":")[0] in {"a at 2 bits", "b at 2 bits"}
    assert p.over([32]).at_plateau and p.over([4]).methods.keys() == {"a", "b"}  # never tested at 4 bits


def test_a_comparison_still_learning_at_its_bit_width_is_a_verdict_when_it_reads_the_same_at_twice_the_epochs():
    ahead, less, none = Difference(1.33, 0.24, 3, 3), Difference(0.55, 0.31, 3, 3), Difference(-0.37, 0.25, 3, 3)
    changed = Doubled(ahead, less, flat=True)  # clearly ahead at 96 epochs, no clear difference at 192
    assert not changed.held and not changed.is_verdict
    assert changed.describe((96, 192)) == ("at 96 epochs +1.33 ± 0.24 pp (s.e.), ahead; "
                                           "at 192 +0.55 ± 0.31 pp (s.e.), no clear difference: changed")
    neither = Doubled(none, less, flat=True)  # no clear difference at either length: that held
    assert neither.held and neither.is_verdict
    assert Doubled(ahead, Difference(2.0, 0.5, 3, 3), flat=True).is_verdict  # the same method clearly ahead
    assert not Doubled(ahead, Difference(-2.0, 0.5, 3, 3), flat=True).held  # the other one
    assert not Doubled(none, less, flat=False).is_verdict  # a method still learning at its highest bit-width
    # under the match test (within 1 pp at both lengths) the same numbers read otherwise
    assert not Doubled(ahead, less, flat=True, test="match").held
    assert Doubled(less, none, flat=True, test="match").is_verdict
    with pytest.raises(ValueError, match="unknown test"):
        ahead.reading("bigger")


def test_the_doubling_check_compares_the_seeds_of_each_length_and_needs_both_lengths_flat_at_the_highest_bit_width():
    def run(rise):  # 32-bit accuracy 80 % rising by ``rise`` pp per epoch over 12 epochs
        return FakeRun([{"epoch": e, "test_acc": {"32": (80.0 + rise * e) / 100}} for e in range(1, 13)])

    # at 2 bits a is 2 pp ahead of b at both lengths, seed for seed
    two_bit = {("a", 12): (0.80, 0.81), ("b", 12): (0.78, 0.79), ("a", 24): (0.82, 0.83), ("b", 24): (0.80, 0.81)}
    acc = pd.DataFrame([{"method": m, "epochs": e, "seed": s, "bits": 2, "acc": a}
                        for (m, e), accs in two_bit.items() for s, a in enumerate(accs)])
    flat = {(m, e, s): run(0.0) for m in "ab" for e in (12, 24) for s in (0, 1)}
    (bits, d), = doubling_check(flat, acc, ("a", "b"), (12, 24)).items()
    assert bits == 2 and d.short.diff_pp == pytest.approx(2.0) and d.long.diff_pp == pytest.approx(2.0)
    assert d.held and d.is_verdict and d.long.reading() == "ahead"
    rising = {**flat, ("b", 24, 0): run(0.2), ("b", 24, 1): run(0.2)}  # b still learning at 32 bits when doubled
    assert not doubling_check(rising, acc, ("a", "b"), (12, 24))[2].is_verdict
