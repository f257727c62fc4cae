"""The package's folders are its layers, and imports only go down them: import-linter checks the
layers contract of pyproject.toml; ruff keeps the small habits (its rule set is in pyproject.toml)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = "import sys, importlinter.cli as c; sys.exit(c.lint_imports(no_cache=True, no_logo=True))"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` (not an installed one), with root's pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", LINT_IMPORTS], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_layer_imports_only_the_layers_below_it():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    shutil.copytree(ROOT / "emq", tmp_path / "emq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    quantizers = tmp_path / "emq" / "quant" / "quantizers.py"
    quantizers.write_text(quantizers.read_text() + "\nfrom emq.training import loop  # noqa: E402\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "emq.quant.quantizers -> emq.training.loop" in proc.stdout


def test_the_tree_is_clean_under_ruff():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
