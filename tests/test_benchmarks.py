"""Benchmarks are not tests, but they must keep running: each module imports and has a main()."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

NAMES = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py") if p.stem != "__init__"
)


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)


@pytest.mark.slow
def test_accelerator_script_runs_at_a_toy_size(tmp_path):
    """The one script a lent GPU runs must not first fail there: the same code, toy sizes, CPU."""
    import json
    import subprocess
    import sys

    out = tmp_path / "accelerator.json"
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.accelerator",
        "--tiny",
        "--instruct",
        "--steps",
        "1",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=root, check=True, timeout=300, capture_output=True)
    report = json.loads(out.read_text())
    assert report["train_step"]["tokens_per_s"] > 0 and report["kl_step"]["vs_plain"] > 1
    assert report["sampler"]["tokens_per_s"] > 0 and report["memory"]["fit_step_bytes"] > 0
    assert report["instruct"]["none"]["ms"] > 0 and report["instruct"]["kl_pre"]["ms"] > 0
