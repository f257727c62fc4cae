"""The synthesis reads every claim from the chapters' recorded numbers: a claim's line follows its
chapter's JSON, and a chapter whose networks still learn gives what its runs show, never a verdict."""
import json
from pathlib import Path

import pytest

from emq.book.synthesis import (
    CHAPTER_TITLES,
    CLAIMS,
    chapter_states,
    doubled_verdicts,
    findings,
    read_numbers,
    scale_of,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = read_numbers(ROOT / "results")


def test_every_chapter_of_the_book_has_claims_and_a_title():
    chapters = {p.stem for p in (ROOT / "book").glob("0[1-6]_*.ipynb")}
    assert set(CLAIMS) == set(CHAPTER_TITLES) == chapters


def test_each_committed_chapter_gives_its_claims_with_the_numbers_it_recorded():
    assert set(COMMITTED) == set(CLAIMS)
    lines = findings(COMMITTED)
    assert {f.chapter for f in lines} == set(CLAIMS)
    bn = COMMITTED["02_shared_bn"]
    first = next(f for f in lines if f.claim.startswith("shared BN without correction"))
    assert first.supported == (bn["claim1_supported"] == 1.0)
    assert f"{bn['claim1_diff_pp']:+.1f} pp" in first.evidence


def test_a_claim_follows_its_chapters_json_when_the_chapter_changes():
    bn = dict(COMMITTED["02_shared_bn"])
    before = findings({"02_shared_bn": bn})[2]
    after = findings({"02_shared_bn": {**bn, "claim3_supported": 1.0 - bn["claim3_supported"]}})[2]
    assert before.claim == after.claim and before.supported is not after.supported


def test_emq_is_ranked_among_the_multi_bit_methods_by_their_2_bit_accuracy():
    n = {"emq_acc_2": 50.0, "lsq_acc_2": 60.0, "qil_acc_2": 40.0, "best_acc_2": 60.0, "full_precision_acc_32": 90.0}
    (f,) = findings({"06_methods": n})
    assert f.supported is False and "rank 2 of 3" in f.evidence and "best lsq 60.0 %" in f.evidence
    (g,) = findings({"06_methods": {**n, "emq_acc_2": 70.0}})
    assert g.supported is True and "rank 1 of 3" in g.evidence


@pytest.mark.parametrize(("flag", "gain", "status"),
                         [(1.0, 0.3, "verdicts"), (0.0, 4.1, "still learning (|mean gain| + s.e. up to 4.1 pp)")])
def test_a_chapter_gives_verdicts_only_when_its_networks_stopped_learning(flag, gain, status):
    (state,) = chapter_states({"01_quantization_bias": {"at_plateau": flag, "max_last_quarter_gain_pp": gain}}, "cpu")
    assert state.at_plateau is (flag == 1.0) and state.status == status


def test_a_claim_whose_own_runs_stopped_learning_is_a_verdict_in_a_chapter_that_still_learns():
    bn = {k: v for k, v in COMMITTED["02_shared_bn"].items() if not k.startswith("claim3_at")}
    (state,) = chapter_states({"02_shared_bn": {**bn, "at_plateau": 0.0, "max_last_quarter_gain_pp": 3.0}}, "cpu")
    as_chapter = findings({"02_shared_bn": bn})[2]
    own = findings({"02_shared_bn": {**bn, "claim3_at_plateau": 1.0}})[2]
    assert as_chapter.at_plateau is None and not as_chapter.is_verdict(state)
    assert own.at_plateau is True and own.is_verdict(state)


def test_the_scale_of_a_chapter_is_read_from_its_grid():
    assert scale_of("02_shared_bn", "cpu") == "resnet-8 x0.5, 2,458 images, 96 epochs, 3 seeds"
    assert scale_of("04_coreset_pruning", "cpu") == "resnet-8 x0.5, 2,458 images, 48 epochs, 3 seeds"
    assert scale_of("05_full_scale", "cpu").startswith("runbook")


def test_the_committed_synthesis_counts_the_chapters_it_read():
    got = json.loads((ROOT / "results" / "chapters" / "07_synthesis.json").read_text())
    states = chapter_states(COMMITTED, "cpu")
    assert got["chapters_read"] == len(COMMITTED)
    assert got["chapters_with_verdicts"] == sum(s.at_plateau is True for s in states)
    assert got["at_plateau"] == float(all(s.at_plateau for s in states if s.at_plateau is not None))


def test_the_cost_against_one_network_per_bit_width_is_a_claim_once_chapter_04_records_it():
    n = dict(COMMITTED["04_coreset_pruning"])
    claim = "trains cheaper than one network per bit-width"
    (f,) = [f for f in findings({"04_coreset_pruning": n}) if f.claim.endswith(claim)]
    assert f.supported == (n["separate_over_joint_passes"] > 1.0)
    older = {k: v for k, v in n.items() if not k.startswith("separate_")}
    assert not [f for f in findings({"04_coreset_pruning": older}) if f.claim.endswith(claim)]


def test_the_joint_network_with_re_estimated_statistics_against_one_per_bit_width_is_judged_on_its_own_runs():
    n = dict(COMMITTED["04_coreset_pruning"])
    claim = "re-estimated per bit-width, is within 1 pp of one network per bit-width"
    for gap, flag, within in ((-0.4, 1.0, True), (-2.5, 0.0, False)):
        (f,) = [f for f in findings({"04_coreset_pruning": {**n, "joint_recal_vs_separate_worst_pp": gap,
                                                             "per_bit_at_plateau": flag}}) if claim in f.claim]
        assert f.supported is within and f.at_plateau is bool(flag)
    older = {k: v for k, v in n.items() if k != "joint_recal_vs_separate_worst_pp"}
    assert not [f for f in findings({"04_coreset_pruning": older}) if claim in f.claim]


def test_a_method_whose_runs_diverged_is_a_claim_of_chapter_06_and_a_stable_one_is_not():
    n = dict(COMMITTED["06_methods"])
    n.update({"shift_diverged_runs": 3.0, "lsq_diverged_runs": 0.0})
    diverged = [f for f in findings({"06_methods": n}) if "without diverging" in f.claim]
    assert [f.claim for f in diverged] == ["`shift` trains without diverging at this scale"]
    assert diverged[0].supported is False and diverged[0].evidence.startswith("3 of its runs")


def test_whether_the_data_is_redundant_is_a_claim_once_chapter_04_records_its_random_subset():
    n = {k: v for k, v in COMMITTED["04_coreset_pruning"].items() if not k.startswith("random_static_worst")}
    claim = "the data is redundant"
    assert not [f for f in findings({"04_coreset_pruning": n}) if f.claim.startswith(claim)]
    side = max(int(k.rsplit("_p", 1)[1].split("_")[0]) for k in n if k.startswith("acc_grand_static_p"))
    for gap, redundant in ((-0.4, True), (-2.5, False)):
        (f,) = [f for f in findings({"04_coreset_pruning": {**n, f"random_static_worst_pp_p{side}": gap}})
                if f.claim.startswith(claim)]
        assert f.supported is redundant and f"{gap:+.1f} pp" in f.evidence


def test_a_related_method_beats_the_baseline_only_by_more_than_twice_its_standard_error_judged_on_its_own_runs():
    n = {"any_precision_acc_2": 81.0, "lsq_acc_2": 82.4, "emq_acc_2": 70.0, "best_acc_2": 82.4,
         "full_precision_acc_32": 83.0, "best_2bit_at_plateau": 1.0, "lsq_vs_any_precision_2bit_pp": 1.33,
         "lsq_vs_any_precision_2bit_se_pp": 0.24, "emq_vs_any_precision_2bit_pp": -10.0,
         "emq_vs_any_precision_2bit_se_pp": 3.0}

    def claim(numbers):
        (f,) = [f for f in findings({"06_methods": numbers}) if f.claim.startswith("a related method")]
        return f

    clear = claim(n)
    assert clear.supported is True and clear.at_plateau is True
    assert "lsq, − any_precision: +1.33 ± 0.24" in clear.evidence
    assert claim({**n, "lsq_vs_any_precision_2bit_se_pp": 0.7}).supported is False  # 1.33 < 2 x 0.7
    assert claim({**n, "best_2bit_at_plateau": 0.0}).at_plateau is False
    baseline = claim({**n, "any_precision_acc_2": 83.0})
    assert baseline.supported is False and "the baseline is the most accurate" in baseline.evidence


def test_a_comparison_at_twice_the_epochs_is_a_verdict_where_the_scale_study_says_it_read_the_same():
    scale = {"verdict_lsq_vs_switchable_2bit_pp_96": 1.33, "verdict_lsq_vs_switchable_2bit_se_pp_96": 0.24,
             "verdict_lsq_vs_switchable_2bit_pp_192": 0.55, "verdict_lsq_vs_switchable_2bit_se_pp_192": 0.31,
             "verdict_2bit_held": 0.0, "verdict_2bit_doubled_verdict": 0.0,
             "bn_verdict_shared_meanvar_vs_switchable_8bit_pp_96": -0.4,
             "bn_verdict_shared_meanvar_vs_switchable_8bit_se_pp_96": 0.3,
             "bn_verdict_shared_meanvar_vs_switchable_8bit_pp_192": -0.2,
             "bn_verdict_shared_meanvar_vs_switchable_8bit_se_pp_192": 0.2,
             "bn_verdict_8bit_held": 1.0, "bn_verdict_8bit_doubled_verdict": 1.0,
             "verdict_lsq_vs_switchable_4bit_pp_96": -0.85,  # one length only: nothing to compare
             "verdict_lsq_vs_switchable_4bit_se_pp_96": 0.52}
    chapter_02, chapter_06 = doubled_verdicts(scale)  # chapter 02's comparison first
    assert chapter_02 == ("shared_meanvar − switchable at 8 bits: -0.40 ± 0.30 pp (s.e.) at 96 epochs, -0.20 ± 0.20 "
                          "pp (s.e.) at 192: matches at both, a verdict")  # chapter 02's test: a match within one point
    assert chapter_06 == ("lsq − switchable at 2 bits: +1.33 ± 0.24 pp (s.e.) at 96 epochs, +0.55 ± 0.31 pp (s.e.) "
                          "at 192: ahead, then no clear difference: changed, not a verdict")  # chapter 06: which leads
    (_, line) = doubled_verdicts({**scale, "verdict_2bit_held": 1.0})
    assert line.endswith("at both (not a verdict: a method still learning at its highest bit-width)")
    assert doubled_verdicts(scale, "bn_verdict") == [chapter_02]  # one chapter's comparison
    assert doubled_verdicts({}) == []
