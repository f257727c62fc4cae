"""Seed statistics read as what they are: a mean with its spread over seeds, and a single seed as
its value and "(1 seed)", never as a spread of zero."""
import math

import pandas as pd
import pytest

from emq.analysis import stats
from emq.analysis.stats import (
    Difference,
    difference,
    format_value,
    interpolate_neighbours,
    largest_ratio_within,
    pm_table,
    select,
)
from emq.book import plots


def frame(cells: dict[tuple[str, int], list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"method": m, "bits": b, "seed": i, "acc": a}
                         for (m, b), accs in cells.items() for i, a in enumerate(accs)])


def test_the_book_writes_a_value_and_its_spread_in_one_place():
    assert plots.format_mean_se is stats.format_mean_se
    assert format_value(84.25, 0.31, 3) == "84.2 ± 0.3"
    assert format_value(84.25, 0.0, 1) == "84.2 (1 seed)"
    assert format_value(-3.1, 0.8, 2, digits=2, sign=True, unit=" pp") == "-3.10 ± 0.80 pp"


def test_pm_table_shows_mean_and_standard_deviation_over_seeds():
    table = pm_table(frame({("a", 2): [0.80, 0.90], ("a", 32): [0.84, 0.86], ("b", 2): [0.70, 0.70]}),
                     "method", "bits", digits=1)
    assert table.loc["a", 2] == "85.0 ± 7.1" and table.loc["a", 32] == "85.0 ± 1.4"
    assert table.loc["b", 2] == "70.0 ± 0.0"  # two seeds that agree: a spread of zero, measured
    assert list(table.columns) == [2, 32] and list(table.index) == ["a", "b"]
    se_table = pm_table(frame({("a", 2): [0.80, 0.90]}), "method", "bits", digits=2, spread="se")
    assert se_table.loc["a", 2] == "85.00 ± 5.00"


def test_pm_table_shows_one_seed_as_its_value_and_one_seed_without_plus_minus():
    table = pm_table(frame({("a", 2): [0.842], ("a", 32): [0.80, 0.90]}), "method", "bits", digits=1)
    assert table.loc["a", 2] == "84.2 (1 seed)"
    assert "±" not in table.loc["a", 2] and table.loc["a", 32] == "85.0 ± 7.1"


def test_a_difference_over_seeds_shows_its_standard_error():
    d = difference(pd.Series([0.80, 0.82]), pd.Series([0.84, 0.86]))
    assert d.diff_pp == pytest.approx(-4.0) and d.se_pp == pytest.approx(100 * math.sqrt(2 * 0.0002 / 2))
    assert d.describe() == f"-4.00 ± {d.se_pp:.2f} pp (s.e.)"
    assert d.clear


def test_a_difference_of_single_seeds_shows_one_seed_and_no_standard_error():
    d = difference(pd.Series([0.80]), pd.Series([0.84]))
    assert d.describe() == "-4.00 pp (1 seed)"
    assert "±" not in d.describe() and not d.clear
    assert Difference(1.5, 0.0, 1, 3).describe() == "+1.50 pp (1 seed)"


def test_select_gives_the_accuracies_of_the_rows_that_match_every_value_named():
    df = frame({("a", 2): [0.80, 0.90], ("a", 4): [0.85], ("b", 2): [0.70, 0.75, 0.72]})
    assert select(df, method="a", bits=2).tolist() == [0.80, 0.90]
    assert select(df, method="b", bits=2, seed=[0, 2]).tolist() == [0.70, 0.72]  # a list: any of its values
    assert select(df, "seed", method="a").tolist() == [0, 1, 0]
    assert select(df, None, method="c").empty and list(select(df, None, bits=4).method) == ["a"]


def test_an_untrained_bit_width_is_set_against_the_straight_line_between_its_trained_neighbours():
    df = frame({("a", 2): [0.60, 0.70], ("a", 4): [0.80, 0.90], ("a", 8): [0.88, 0.90], ("b", 2): [0.1, 0.1]})
    assert interpolate_neighbours(df, 3, (2, 4, 8, 32), method="a").tolist() == pytest.approx([0.70, 0.80])
    assert interpolate_neighbours(df, 5, (2, 4, 8, 32), method="a").tolist() == pytest.approx([0.82, 0.90])
    with pytest.raises(ValueError, match="on each side"):
        interpolate_neighbours(df, 1, (2, 4, 8, 32), method="a")
    with pytest.raises(ValueError, match="not the same seeds"):
        interpolate_neighbours(frame({("a", 2): [0.6, 0.7], ("a", 4): [0.8]}), 3, (2, 4), method="a")


def test_the_largest_ratio_within_a_margin_stops_at_the_first_ratio_that_falls_outside_it():
    worst = {0.5: -0.8, 0.3: -0.2, 0.6: -0.1, 0.8: -3.0}  # ratio -> worst bit-width's difference, pp
    assert largest_ratio_within(worst, 0.5) == 0.3  # 0.6 is within again, but after 0.5 fell outside
    assert largest_ratio_within(worst, 1.0) == 0.6
    assert largest_ratio_within({0.3: -2.0, 0.5: 0.0}, 1.0) == 0.0
