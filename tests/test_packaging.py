"""The project's install descriptions agree, and every shipped parameter file loads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from forgetting_lib import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs.update(r for r in extra if not r.startswith("forgetting_lib"))
    return {re.sub(r"\s+", "", r) for r in reqs}


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {re.sub(r"\s+", "", r) for r in pip if not r.startswith("-e")}
    assert listed == _pyproject_requirements()
    assert "-e ." in pip
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert tuple(int(x) for x in python.split("=")[1].split(".")) >= \
        tuple(int(x) for x in requires.lstrip(">=").split("."))


PARAM_FILES = sorted((ROOT / "params").rglob("*.yaml"))


def test_there_are_parameter_files():
    assert any("quick" in p.parts for p in PARAM_FILES)


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_parameter_file_loads(path):
    raw = yaml.safe_load(path.read_text())
    if "base" in raw or "grid" in raw:  # sweep specs are validated by the sweep module
        pytest.skip("sweep spec")
    cfg = config_lib.load(path)
    assert cfg.stop != config_lib.StopConfig()  # every shipped run has a stop rule


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make quickstart" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
