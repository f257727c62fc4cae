"""environment.yml (for conda GPU boxes) names the same pins as requirements.txt."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_environment_yml_parses_and_pins_what_requirements_txt_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "emq"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = sorted(p for p in pip if not p.startswith("-e"))
    assert conda_pins == sorted(requirement_lines((ROOT / "requirements.txt").read_text()))
    assert "torch==2.14.1" in conda_pins and "torchvision==0.29.1" in conda_pins


def test_environment_yml_gets_the_cuda_build_of_torch():
    """On Linux x86_64 PyPI's torch wheel is the CUDA build: nothing may point pip at the CPU-only
    index or a +cpu local version, and Python is the 3.11 the package is tested with."""
    text = (ROOT / "environment.yml").read_text()
    env = yaml.safe_load(text)
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert not any("whl/cpu" in p or "+cpu" in p or p.startswith("--index-url") for p in pip)
    assert "cpuonly" not in text and "pytorch-cpu" not in text
