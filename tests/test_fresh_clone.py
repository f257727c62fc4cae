"""A clone of the repository at any other path reads the committed runs: every run a chapter
read at the ``cpu`` profile is found, finished, under the hash the clone computes for it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys
from pathlib import Path
from emq.book.chapter import Chapter
from emq.config import from_dict

missing = []
for listing in sorted(Path("results/chapters").glob("*.runs.json")):
    chapter = listing.name.removesuffix(".runs.json")
    ch = Chapter(chapter, "cpu")  # the clone's own data root, an absolute path unlike the original's
    for run_hash, non_default in json.loads(listing.read_text()).items():
        cfg = from_dict(non_default).with_overrides({"data.root": ch.base.data.root})
        if cfg.hash() != run_hash or not ch.store.is_finished(cfg):
            missing.append(f"{chapter}: {run_hash}")
print(json.dumps({"missing": missing, "emq": __import__("emq").__file__}))
"""


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("elsewhere") / "a" / "clone of emq"
    proc = subprocess.run(["git", "clone", "-q", str(ROOT), str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"git clone failed: {proc.stderr.strip()}")
    return path


def test_every_run_the_cpu_chapters_read_is_in_the_store_of_a_clone_at_another_path(clone):
    listings = sorted((clone / "results" / "chapters").glob("*.runs.json"))
    chapters = sorted((clone / "book").glob("[0-9][0-9]_*.ipynb"))
    assert [p.name.removesuffix(".runs.json") for p in listings] == [p.stem for p in chapters]
    assert sum(len(json.loads(p.read_text())) for p in listings) > 0
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=clone, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert Path(out["emq"]).resolve().is_relative_to(clone.resolve())  # the clone's package, not this one's
    assert out["missing"] == []  # 0 runs to train
