"""The book's claims can be checked by a program: every number glued into a chapter's prose is
the one in ``results/chapters/<chapter>.json``, and every glue the prose names exists."""
import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
GLUE_REF = re.compile(r"\{glue:text\}`(?:([\w.]+\.ipynb)::)?(\w+)(?::[^`]*)?`")


def glued(nb) -> dict[str, float]:
    """name -> value of every glue output of an executed notebook."""
    out = {}
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            meta = o.get("metadata", {}).get("scrapbook")
            if meta:
                out[meta["name"]] = float(o["data"][meta["mime_prefix"] + "text/plain"])
    return out


def prose_refs(nb) -> set[str]:
    return {m.group(2) for c in nb.cells if c.cell_type == "markdown" for m in GLUE_REF.finditer(c.source)}


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_glued_number_is_the_chapters_json_number_and_every_reference_resolves(path):
    nb = nbformat.read(path, as_version=4)
    values = glued(nb)
    if not values:
        pytest.fail(f"{path.name} is committed without executed outputs: run `make book`")
    numbers = json.loads((ROOT / "results" / "chapters" / f"{path.stem}.json").read_text())
    assert prose_refs(nb) <= set(values), "the prose names a glue the chapter does not make"
    for name, value in values.items():
        assert numbers[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapters_have_a_parameters_cell_with_a_profile(path):
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and re.search(r'^profile = "cpu"', params[0].source, re.M)


MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|home|tmp|root|Users|mnt|opt|var|srv|scratch)/")


@pytest.mark.parametrize("path", CHAPTERS + sorted((ROOT / "tests" / "notebooks").glob("*.ipynb")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_no_committed_output_names_a_path_of_the_machine_it_ran_on(path):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = json.dumps(out)
            assert str(ROOT) not in text and not MACHINE_PATH.search(text), f"cell {i}: {MACHINE_PATH.search(text)}"
