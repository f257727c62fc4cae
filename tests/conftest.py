"""Shared test set-up: one torch thread per test and per process the tests start, and the
notebooks' smoke runs start from an empty results store."""
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_RESULTS = ROOT / "_build" / "test-results"  # results_dir of tests/notebooks/*.ipynb
DATA_ROOT = ROOT / "data"
HAVE_DATA = (DATA_ROOT / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"Fashion-MNIST not under {DATA_ROOT} (python -m emq data fetch)")

# The tests' tiny runs, as overrides of the smoke profile: ResNet-8 at quarter width on 256 images,
# two epochs of four steps; TINY_1_EPOCH: one epoch of two steps on 128 images; TINY_METHODS: the
# smoke profile's network (as the methods' chapter trains it) on 128 images, two epochs of four steps.
TINY = {"data.root": str(DATA_ROOT), "data.train_size": 256, "data.test_size": 128, "model.depth": 8,
        "model.width": 0.25, "train.batch_size": 64, "train.epochs": 2}
TINY_1_EPOCH = {**TINY, "data.train_size": 128, "data.test_size": 64, "train.epochs": 1}
TINY_METHODS = {"data.root": str(DATA_ROOT), "data.train_size": 128, "data.test_size": 64, "train.batch_size": 32,
                "train.epochs": 2}

# Whether this session collected the smoke chapters for nbval (set below, read by test_chapter_numbers.py)
NOTEBOOKS_RAN = pytest.StashKey[bool]()


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
    notebooks = [i for i in items if i.path.suffix == ".ipynb"]
    items[:] = notebooks + [i for i in items if i.path.suffix != ".ipynb"]
    config.stash[NOTEBOOKS_RAN] = bool(notebooks)
