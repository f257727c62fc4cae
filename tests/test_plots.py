"""What the chapters show is readable: every bit-width has its own colour, also for colour-blind
readers; a single seed is never shown with a ± of zero; run hashes fold away; tables scroll."""
import itertools
import math

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from emq.book.plots import (  # noqa: E402
    BIT_MARKERS,
    BIT_PALETTE,
    bit_color,
    bit_palette,
    bit_style,
    format_mean_se,
    legend_outside,
    runs_note,
    show_table,
)

# Colour-vision deficiency simulation (Machado, Oliveira & Fernandes 2009, severity 1), on linear RGB.
VISION = {
    "normal": np.eye(3),
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.303900]]),
}
TRAINED, UNTRAINED = (2, 4, 8, 32), (3, 5, 6, 7)
DRAWN_TOGETHER = (set(itertools.combinations(TRAINED, 2)) | set(itertools.combinations(UNTRAINED, 2))
                  | {(b, b + 1) for b in range(1, 8)} | {(8, 32)})


def lab(hex_color: str, vision: str) -> np.ndarray:
    """CIELAB (D65) of ``hex_color`` as seen with ``vision``."""
    srgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    rgb = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    rgb = np.clip(VISION[vision] @ rgb, 0, 1)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def difference(a: int, b: int) -> float:
    """The smallest CIELAB distance between the colours of bit-widths a and b over the four visions."""
    return min(float(np.linalg.norm(lab(bit_color(a), v) - lab(bit_color(b), v))) for v in VISION)


def test_every_bit_width_of_the_book_has_its_own_colour_and_marker():
    bits = (1, 2, 3, 4, 5, 6, 7, 8, 32)
    assert set(BIT_PALETTE) == set(BIT_MARKERS) == set(bits)
    assert len({bit_color(b).lower() for b in bits}) == len(bits)
    assert len(set(BIT_MARKERS.values())) == len(bits)


@pytest.mark.parametrize("a, b", sorted(DRAWN_TOGETHER))
def test_bit_widths_drawn_together_stay_apart_for_colour_blind_readers(a, b):
    """2 vs 3, 2 vs 4 (the two that looked alike under viridis) and every other pair drawn in one
    figure differ by at least 20 CIELAB units, also under protanopia, deuteranopia and tritanopia."""
    assert difference(a, b) >= 20


def test_any_two_bit_widths_are_distinguishable_in_every_vision():
    assert min(difference(a, b) for a, b in itertools.combinations(BIT_PALETTE, 2)) >= 15


def test_the_palette_is_fixed_not_computed_from_the_bits_at_hand():
    """Chapter 01 drawing {2, 3} and chapter 05 drawing {2, 4, 8} give 2 bits the same colour."""
    assert bit_palette([2, 3])[2] == bit_palette([2, 4, 8])[2] == bit_color(2)
    assert bit_style(32) == {"color": "#000000", "marker": "*", "label": "full precision"}


def test_a_bit_width_outside_the_palette_is_a_one_line_error():
    with pytest.raises(ValueError, match="no colour for bit-width 12"):
        bit_color(12)


def test_several_seeds_show_the_mean_and_its_standard_error():
    values = [0.84, 0.85, 0.83]
    se = np.std(values, ddof=1) / math.sqrt(3)
    assert format_mean_se(values, scale=100) == f"84.0 ± {100 * se:.1f}"
    assert format_mean_se([0.80, 0.90], scale=100, digits=2) == "85.00 ± 5.00"  # std 7.07, s.e. 5.00
    assert format_mean_se([0.80, 0.90], scale=100, spread="std") == "85.0 ± 7.1"


def test_one_seed_shows_its_value_and_one_seed_with_no_plus_minus():
    text = format_mean_se([0.842], scale=100)
    assert text == "84.2 (1 seed)"
    assert "±" not in text and "0.0" not in text.replace("84.2", "")


def test_no_value_or_a_missing_value_is_an_error_not_a_number():
    with pytest.raises(ValueError, match="at least one"):
        format_mean_se([])
    with pytest.raises(ValueError, match="NaN"):
        format_mean_se([0.8, float("nan")])


class FakeRun:
    def __init__(self, hash_):
        self.hash = hash_


def test_runs_note_folds_the_hashes_of_runs_into_a_closed_details_block():
    html = runs_note([FakeRun("bbb222"), FakeRun("aaa111"), FakeRun("aaa111")]).data
    assert html.startswith('<details class="emq-runs">') and "open" not in html
    assert "<summary>runs (2)</summary>" in html
    assert html.index("aaa111") < html.index("bbb222")  # sorted, once each


def test_runs_note_takes_hashes_and_escapes_them():
    assert "<code>a&lt;b</code>" in runs_note(["a<b"]).data
    with pytest.raises(ValueError, match="no runs"):
        runs_note([])


def test_show_table_wraps_an_html_table_in_its_own_scroll_box():
    import pandas as pd

    wide = pd.DataFrame({f"{b}-bit": [f"8{b}.0 ± 0.{b}"] for b in (2, 3, 4, 5, 6, 7, 8, 32)}, index=["shared"])
    html = show_table(wide, caption="zero-shot accuracy (%)").data
    assert html.startswith('<div class="emq-scroll" style="overflow-x: auto; max-width: 100%;">')
    assert "<table" in html and "32-bit" in html and "zero-shot accuracy (%)" in html
    assert html.endswith("</div>")


def test_legend_outside_puts_the_legend_beside_the_axes_not_over_the_data():
    fig, ax = plt.subplots(figsize=(4, 3))
    for b in (2, 4, 8, 32):
        ax.plot([0, 1], [b, b], **bit_style(b))
    legend = legend_outside(ax)
    fig.canvas.draw()
    box, axes = legend.get_window_extent(), ax.get_window_extent()
    plt.close(fig)
    assert box.x0 >= axes.x1
