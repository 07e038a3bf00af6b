"""The project's install descriptions agree, and every shipped parameter file loads."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from forgetting_lib import config as config_lib, methods
from forgetting_lib.experiments.notebooks import WALKTHROUGH, parameters_of

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
    assert tuple(int(x) for x in python.split("=")[1].split(".")) >= tuple(
        int(x) for x in requires.lstrip(">=").split(".")
    )


PARAM_FILES = sorted((ROOT / "params").rglob("*.yaml"))
NOTEBOOKS = {p.stem: p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts}


def _notebook_of(path: Path) -> Path | None:
    """The notebook a parameter file is for: `params/<scale>/<notebook name>.yaml`, or a file
    whose top-level `notebook` key names it (relative to notebooks/); None for run configs."""
    raw = yaml.safe_load(path.read_text())
    if isinstance(raw, dict) and isinstance(raw.get("notebook"), str):
        return ROOT / "notebooks" / f"{raw['notebook']}.ipynb"
    return NOTEBOOKS.get(path.stem)


def _is_notebook_params(path: Path) -> bool:
    return _notebook_of(path) is not None


def test_there_are_parameter_files():
    assert any("quick" in p.parts for p in PARAM_FILES)


@pytest.mark.parametrize(
    "path", [p for p in PARAM_FILES if not _is_notebook_params(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_parameter_file_loads(path):
    cfg = config_lib.load(path)
    assert cfg.stop != config_lib.StopConfig()  # every shipped run has a stop rule


@pytest.mark.parametrize(
    "path", [p for p in PARAM_FILES if _is_notebook_params(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_notebook_parameter_file_matches_its_notebook(path):
    raw = yaml.safe_load(path.read_text())
    raw.pop("notebook", None)
    defaults = parameters_of(_notebook_of(path))
    unknown = set(raw) - set(defaults)
    assert not unknown, f"{path.relative_to(ROOT)} sets {unknown}: not in the notebook's parameters cell"
    if path.stem in WALKTHROUGH:  # the walkthrough's files list every parameter: a full starting point
        assert set(raw) == set(defaults), f"{path.relative_to(ROOT)} must set every parameter"
    for key, value in raw.items():  # same kinds of values as the notebook's defaults
        default = defaults[key]
        assert (
            value is None
            or default is None
            or isinstance(value, type(default))
            or (isinstance(value, (int, float)) and isinstance(default, (int, float)))
        ), key
    if "run_config" in raw:  # the embedded run config (file or mapping) loads with every override
        source = raw["run_config"]
        source = ROOT / source if isinstance(source, str) else source
        for method in (methods.named(raw["methods"]) if raw.get("methods") else {"": {}}).values():
            config_lib.load(source, [*raw["overrides"].items(), *method.items()])


def test_every_walkthrough_notebook_has_quick_and_paper_parameters():
    for name in WALKTHROUGH:
        for scale in ("quick", "paper"):
            assert (ROOT / "params" / scale / f"{name}.yaml").is_file(), f"params/{scale}/{name}.yaml"


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make quickstart" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "path",
    [p for p in PARAM_FILES if "quick" in p.parts and _is_notebook_params(p)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_a_notebook_opened_as_is_runs_its_quick_parameters(path):
    """A notebook opened in JupyterLab runs its parameters cell's defaults, papermill the quick
    file: a scalar default that differs (a figure's target loss, say) would give other numbers."""
    raw = yaml.safe_load(path.read_text())
    defaults = parameters_of(_notebook_of(path))
    differ = {
        key: (defaults[key], value)
        for key, value in raw.items()
        if key in defaults and isinstance(defaults[key], (int, float, str, bool)) and defaults[key] != value
    }
    assert not differ, f"{path.relative_to(ROOT)}: notebook default vs quick file {differ}"
