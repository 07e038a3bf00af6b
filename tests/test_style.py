"""The code style the project keeps: ruff's lint rules and formatter (configured in pyproject.toml)
over the library, tests, benchmarks and notebooks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ["forgetting_lib", "tests", "benchmarks", "notebooks"]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    out = subprocess.run(
        [sys.executable, "-m", "ruff", *command, *TREES], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, (
        f"ruff {' '.join(command)} (fix: ruff check --fix / ruff format):\n{out.stdout}{out.stderr}"
    )
