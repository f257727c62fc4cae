"""How the chapters show results, the same way in every chapter.

- One colour per bit-width (:data:`BIT_PALETTE`, :func:`bit_color`): categorical and safe for
  colour-blind readers, so that 2 and 3 bits, or 2 and 4 bits, never share a hue.
- ``mean ± s.e.`` over seeds, or the value and "(1 seed)" where there is one seed
  (:func:`format_mean_se`, from :mod:`emq.analysis.stats`): a single seed never reads as zero variance.
- The run hashes behind a figure or table in a folded "runs" note (:func:`runs_note`).
- Tables as HTML that scroll inside their own box (:func:`show_table`), never cut off.
- Legends beside the axes, not over the data (:func:`legend_outside`).
"""
from __future__ import annotations

import html
from collections.abc import Iterable

import pandas as pd

from emq.analysis.stats import format_mean_se  # noqa: F401  (re-exported: the chapters show values with it)

# The Okabe-Ito palette (Okabe & Ito, "Color Universal Design", 2002) and Paul Tol's "wine" as a
# ninth colour. Placed so that the bit-widths drawn together -- the trained {2, 4, 8, 32}, the
# untrained {3, 5, 6, 7} and every two neighbours -- differ by at least 20 CIELAB units in normal
# vision and under simulated protanopia, deuteranopia and tritanopia (tests/test_plots.py), and
# yellow, faint on white, goes to 1 bit, which no chapter plots beside the others.
BIT_PALETTE: dict[int, str] = {
    1: "#F0E442",   # yellow
    2: "#882255",   # wine
    3: "#56B4E9",   # sky blue
    4: "#E69F00",   # orange
    5: "#0072B2",   # blue
    6: "#CC79A7",   # reddish purple
    7: "#D55E00",   # vermillion
    8: "#009E73",   # bluish green
    32: "#000000",  # black: full precision
}
# A marker per bit-width as well, for print in grey and for readers who tell colours apart poorly.
BIT_MARKERS: dict[int, str] = {1: "v", 2: "o", 3: "^", 4: "s", 5: "D", 6: "P", 7: "X", 8: "p", 32: "*"}


def bit_color(bits: int) -> str:
    """The colour of bit-width ``bits`` (hex), the same in every chapter."""
    try:
        return BIT_PALETTE[bits]
    except (KeyError, TypeError):
        raise ValueError(f"no colour for bit-width {bits!r}: the palette covers "
                         f"{', '.join(map(str, BIT_PALETTE))}") from None


def bit_palette(bits: Iterable[int]) -> dict[int, str]:
    """``{bits: colour}`` for the given bit-widths, e.g. seaborn's ``palette=`` with ``hue="bits"``."""
    return {b: bit_color(b) for b in bits}


def bit_label(bits: int) -> str:
    """``"2-bit"``, ..., ``"full precision"`` for 32."""
    bit_color(bits)
    return "full precision" if bits == 32 else f"{bits}-bit"


def bit_style(bits: int) -> dict[str, str]:
    """Keyword arguments for ``ax.plot``: colour, marker and label of bit-width ``bits``."""
    return {"color": bit_color(bits), "marker": BIT_MARKERS[bits], "label": bit_label(bits)}


def _hashes(runs_or_hashes) -> list[str]:
    if isinstance(runs_or_hashes, str):
        runs_or_hashes = [runs_or_hashes]
    return sorted({r if isinstance(r, str) else r.hash for r in runs_or_hashes})


def runs_note(runs_or_hashes):
    """A folded "runs" note naming the results-store folders a figure or table was read from.

    Takes runs (anything with ``.hash``) or hashes. Returns an ``IPython.display.HTML``: make it
    the last line of the cell, or ``display(runs_note(runs))``.
    """
    from IPython.display import HTML

    hashes = _hashes(runs_or_hashes)
    if not hashes:
        raise ValueError("runs_note got no runs")
    codes = ", ".join(f"<code>{html.escape(h)}</code>" for h in hashes)
    return HTML(f'<details class="emq-runs"><summary>runs ({len(hashes)})</summary>'
                f"<p>Read from <code>results/runs/</code>: {codes}</p></details>")


def show_table(df: pd.DataFrame, caption: str | None = None, index: bool = True, float_format=None):
    """``df`` as an HTML table in a box of its own that scrolls sideways when the table is wider
    than the page. Returns an ``IPython.display.HTML`` (the last line of the cell, or ``display``)."""
    from IPython.display import HTML

    table = df.to_html(index=index, border=0, classes=["dataframe", "emq-table"], float_format=float_format)
    head = f'<p class="emq-table-caption">{html.escape(caption)}</p>' if caption else ""
    return HTML(f'<div class="emq-scroll" style="overflow-x: auto; max-width: 100%;">{head}{table}</div>')


def legend_outside(ax, **kwargs):
    """The legend of ``ax`` to the right of the axes, where it covers no data."""
    opts = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "frameon": False}
    return ax.legend(**{**opts, **kwargs})
