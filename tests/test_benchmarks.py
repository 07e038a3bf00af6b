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
