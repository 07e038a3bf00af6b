"""The house rules of the package layout: no import cycles, layers that import only downwards,
notebooks that use only the public surface, and a public surface that resolves."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import forgetting_lib
from forgetting_lib import figures

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "forgetting_lib"
# Layers, lowest first: a module may import its own layer and the ones below it.
LAYERS = {"prep": 1, "engine": 2, "experiments": 3, "figures": 4}
ENTRY_POINTS = {"forgetting_lib", "forgetting_lib.__main__"}  # they import from every layer
# config validates reg.method against the engine's registry and log.mc_evals against the
# benchmark formats (inside functions: importing config stays free of JAX); the upward edges.
ALLOWED_UPWARD = {
    ("forgetting_lib.config", "forgetting_lib.engine.regularisers"),
    ("forgetting_lib.config", "forgetting_lib.prep.benchmarks"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """forgetting_lib modules that `path` imports anywhere (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("forgetting_lib")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("forgetting_lib"):
                continue
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{target}.{alias.name}"
                found.add(
                    sub
                    if (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file()
                    or (ROOT / Path(*sub.split("."))).is_dir()
                    else target
                )
    return found - {name}


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_import_graph_has_no_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH.get(module, ())):
            if dep not in GRAPH or dep.startswith("forgetting_lib.__main__") or module in ENTRY_POINTS:
                continue
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_layers_import_only_downwards():
    upward = sorted(
        (m, d)
        for m, deps in GRAPH.items()
        if m not in ENTRY_POINTS
        for d in deps
        if d in GRAPH and _layer(d) > _layer(m) and (m, d) not in ALLOWED_UPWARD
    )
    assert not upward, f"modules importing a higher layer: {upward}"


def test_every_public_name_resolves():
    for name in forgetting_lib.__all__:
        assert getattr(forgetting_lib, name) is not None, name
    for name in figures.__all__:
        assert getattr(figures, name) is not None, name
    assert "forgetting_lib" in repr(forgetting_lib.plots)


def test_importing_the_package_does_not_import_jax():
    code = "import sys, forgetting_lib as fl; fl.load_config; fl.methods; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # notebooks call fl.configure() before JAX starts


NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _public(module: str, name: str) -> bool:
    if module == "forgetting_lib":
        return name in forgetting_lib.__all__
    if module == "forgetting_lib.figures":
        return name in figures.__all__
    return False


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT / "notebooks")))
def test_notebooks_use_only_public_names(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    tree = ast.parse("\n".join("".join(c["source"]) for c in cells))
    aliases, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "forgetting_lib":
                    aliases.add(a.asname or a.name)
                elif a.name.startswith("forgetting_lib"):
                    private.append(a.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("forgetting_lib"):
            private += [f"{node.module}.{a.name}" for a in node.names if not _public(node.module, a.name)]
    for node in ast.walk(tree):  # fl.<name> must be public too
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr not in forgetting_lib.__all__:
                private.append(f"forgetting_lib.{node.attr}")
    assert aliases or "forgetting_lib" not in path.read_text()
    assert not private, f"{path.name} uses non-public names: {private}"
