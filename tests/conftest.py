"""Shared test set-up: the notebooks' smoke runs start from an empty results store."""
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_RESULTS = ROOT / "_build" / "test-results"  # results_dir of tests/notebooks/*.ipynb


def pytest_sessionstart(session):
    """Remove the notebooks' results store, so nbval re-trains instead of reading back."""
    shutil.rmtree(NOTEBOOK_RESULTS, ignore_errors=True)
