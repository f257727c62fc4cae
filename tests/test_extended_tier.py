"""The book within its budget: from a store that holds only the core of their grids (what `make runs`
trains), the chapters with an extended tier execute, leave the extended runs out and say so, and the
synthesis reads their numbers."""
import json
from pathlib import Path

import papermill
import pytest
from conftest import needs_data

from emq.book.grids import grid_configs
from emq.book.synthesis import findings, read_numbers
from emq.results import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
# what each chapter records only from its extended runs, and what it records from its core
LEFT_OUT = {"02_shared_bn": ("claim2_shared_mean_supported", "claim2_shared_meanvar_supported"),
            "04_coreset_pruning": ("dynamic_scoring_share_pct", "static_scoring_share_pct"),
            "06_methods": ("double_rounding_acc_2", "lsq_acc_2")}


@needs_data
@pytest.mark.parametrize("chapter", sorted(LEFT_OUT))
def test_a_chapter_executes_from_the_core_of_its_grid_and_says_what_it_left_out(chapter, tmp_path):
    results = tmp_path / "results"
    out = tmp_path / f"{chapter}.ipynb"
    papermill.execute_notebook(ROOT / "book" / f"{chapter}.ipynb", out, cwd=ROOT / "book", progress_bar=False,
                               parameters={"profile": "smoke", "results_dir": str(results)})
    store = ResultsStore(results)
    core = {c.hash() for c in grid_configs(chapter, "smoke", extended=False)}
    assert core and {r.hash for r in store.runs()} == core  # the core trained, nothing of the extended tier
    assert "left out, not in the store: the extended tier's" in out.read_text()
    numbers = json.loads((results / "chapters" / f"{chapter}.json").read_text())
    extended_only, core_number = LEFT_OUT[chapter]
    assert extended_only not in numbers and core_number in numbers
    assert {f.chapter for f in findings(read_numbers(results))} == {chapter}
