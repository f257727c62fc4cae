"""Shared test set-up: one torch thread per test and per process the tests start, and the
notebooks' smoke runs start from an empty results store."""
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_RESULTS = ROOT / "_build" / "test-results"  # results_dir of tests/notebooks/*.ipynb


def pytest_sessionstart(session):
    """Remove the notebooks' results store, so nbval re-trains instead of reading back; and give
    every process the tests start (nbval kernels, command-line runs) one thread, as
    ``make test-reference`` does, since a different thread count sums in another order and
    changes the last digits of a training run, on which the checked notebook outputs depend."""
    shutil.rmtree(NOTEBOOK_RESULTS, ignore_errors=True)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the tests' tensors are tiny, and on a busy 2-core machine OpenMP
    threads spinning against another process make torch many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_collection_modifyitems(session, config, items):
    """nbval's re-execution of the smoke chapters runs first, so that the numbers it writes are
    there for ``test_chapter_numbers.py`` (which is told whether they were executed at all)."""
    from test_chapter_numbers import NOTEBOOKS_RAN

    notebooks = [i for i in items if i.path.suffix == ".ipynb"]
    items[:] = notebooks + [i for i in items if i.path.suffix != ".ipynb"]
    config.stash[NOTEBOOKS_RAN] = bool(notebooks)
