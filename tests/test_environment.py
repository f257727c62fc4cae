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
