"""Running the numbered notebooks in batch with papermill, and their shared setup.

`run_notebook("03_pretrain", "params/quick/03_pretrain.yaml", "outputs/quickstart/notebooks")`
executes `notebooks/03_pretrain.ipynb` with the parameter file's values injected after its
`parameters` cell, and writes the executed copy (outputs and figures included) to the out folder.
Notebook parameter files are `params/<scale>/<notebook name>.yaml`; their keys are the variables
of the notebook's `parameters` cell (a test checks this).

Executed notebooks keep their figures: `setup()` makes plotly render as
`plotly_mimetype+notebook`, i.e. every figure is stored in the .ipynb as plotly JSON (drawn by
JupyterLab's bundled plotly extension, offline, whether or not the notebook is trusted) plus an
HTML fallback with plotly.js embedded (no CDN), for viewers without the extension.

Relative paths in notebook parameters are relative to the project root: the folder holding
`notebooks/`. JupyterLab starts a kernel in the notebook's own folder, so `setup()` moves a
kernel that starts inside a `notebooks/` folder up to that folder's parent; papermill kernels
start in the caller's current directory (the project root for `make` and the CLI examples).

Kernels talk to papermill over IPC sockets (files in the Jupyter runtime folder), not
unencrypted TCP on localhost, so nothing else on the machine can read or drive them (and
ipykernel has nothing to warn about).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..fileio import read_yaml

PROJECT_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
PLOTLY_RENDERER = "plotly_mimetype+notebook"
WALKTHROUGH = ("01_tokenizer", "02_binarize", "03_pretrain", "04_finetune_replay")


class NotebookError(RuntimeError):
    """A notebook failed; the message names the notebook, the failing cell and the error."""


def notebook_path(name_or_path: str | Path) -> Path:
    """`notebooks/<name>.ipynb` for a name ("03_pretrain", "figures/high_lr"), else the given path."""
    path = Path(name_or_path)
    if path.suffix != ".ipynb" and not path.is_absolute():
        path = NOTEBOOK_DIR / f"{path}.ipynb"
    if not path.is_file():
        names = sorted(
            str(p.relative_to(NOTEBOOK_DIR).with_suffix(""))
            for p in NOTEBOOK_DIR.rglob("*.ipynb")
            if ".ipynb_checkpoints" not in p.parts
        )
        raise NotebookError(f"notebook {path} does not exist (names: {', '.join(names)})")
    return path


def parameters_of(name_or_path: str | Path) -> dict[str, Any]:
    """The variables of a notebook's `parameters` cell with their default values (each must be a
    plain `name = <Python literal>` assignment)."""
    import ast

    import nbformat

    path = notebook_path(name_or_path)
    book = nbformat.read(path, as_version=4)
    cell = next(
        (c for c in book.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])), None
    )
    if cell is None:
        raise NotebookError(f"{path.name} has no code cell tagged `parameters`")
    values = {}
    for node in ast.parse(cell.source).body:
        if not (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            raise NotebookError(
                f"{path.name}: its parameters cell may hold only `name = literal` "
                f"lines, not `{ast.unparse(node)}`"
            )
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def load_parameters(parameters: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """A parameter file (YAML mapping) or dict as a dict; None -> {} (the notebook's defaults).
    A top-level `notebook` key (which notebook a file is for) is not a parameter and is dropped."""
    if parameters is None:
        return {}
    if isinstance(parameters, Mapping):
        return dict(parameters)
    if not Path(parameters).is_file():
        raise NotebookError(f"parameter file {parameters} does not exist")
    raw = read_yaml(parameters)
    if not isinstance(raw, dict):
        raise NotebookError(f"parameter file {parameters} must hold a YAML mapping of name: value")
    raw.pop("notebook", None)
    return raw


def run_notebook(
    name_or_path: str | Path,
    parameters: str | Path | Mapping[str, Any] | None,
    out_dir: str | Path,
    *,
    cwd: str | Path | None = None,
    kernel: str = "python3",
    stream_output: bool = False,
) -> Path:
    """Execute a notebook with papermill and return the executed copy `out_dir/<name>.ipynb`.

    Unknown parameter names are an error (they would be silently ignored). The kernel runs in
    `cwd` (default: the current folder; relative paths in the parameters are relative to it) with
    FORGETTING_PLAIN_PROGRESS=1, so progress is printed as plain periodic lines;
    `stream_output=True` also copies the cells' printed output to this process's stdout/stderr.
    """
    import sys

    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebook_path(name_or_path)
    values = load_parameters(parameters)
    unknown = sorted(set(values) - set(parameters_of(source)))
    if unknown:
        raise NotebookError(
            f"{source.name}: unknown parameter(s) {', '.join(unknown)}; its "
            f"parameters cell defines {', '.join(parameters_of(source))}"
        )
    out = Path(out_dir) / source.name
    out.parent.mkdir(parents=True, exist_ok=True)
    with _environment(FORGETTING_PLAIN_PROGRESS="1"):
        try:
            papermill.execute_notebook(
                str(source),
                str(out),
                parameters=values,
                kernel_name=kernel,
                cwd=str(cwd or Path.cwd()),
                progress_bar=False,
                stdout_file=sys.stdout if stream_output else None,
                stderr_file=sys.stderr if stream_output else None,
                config=_kernel_config(),
            )
        except PapermillExecutionError as err:
            first = next((line for line in err.source.splitlines() if line.strip()), "")
            raise NotebookError(
                f"{source.name} failed in code cell {err.exec_count} "
                f"(`{first.strip()}`): {err.ename}: {err.evalue}; the executed "
                f"notebook with the full traceback is {out}"
            ) from err
    return out


def run_notebooks(
    names: Sequence[str],
    params_dir: str | Path,
    out_dir: str | Path,
    *,
    keep_going: bool = False,
    timings: str | Path | None = None,
) -> dict[str, Any]:
    """Execute notebooks in order ("01_tokenizer", "figures/high_lr", ...), each with
    `<params_dir>/<its file name>.yaml`, the executed copies into `out_dir`; the one runner
    behind the quickstart and `reproduce`. Prints a line before and after each. Returns {name:
    seconds, or "failed: ..." where `keep_going` let the others run on}; without `keep_going`
    the first failure raises. `timings` (a JSON file) is rewritten after every notebook."""
    from ..fileio import atomic_write_json

    results: dict[str, Any] = {}
    for name in names:
        params = Path(params_dir) / f"{Path(name).name}.yaml"
        start = time.perf_counter()
        print(f"== {name} ({params})", flush=True)
        try:
            run_notebook(name, params, out_dir, stream_output=True)
            results[name] = round(time.perf_counter() - start, 1)
        except Exception as err:
            if not keep_going:
                raise
            results[name] = f"failed: {type(err).__name__}: {err}"
        done = f"{results[name]} s" if isinstance(results[name], float) else results[name]
        print(f"== {name}: {done}", flush=True)
        if timings is not None:
            atomic_write_json(Path(timings), results)
    return results


def _kernel_config() -> Any:
    """nbclient's traitlets config for one kernel: IPC transport where it can (POSIX), its sockets
    under a name of its own in the Jupyter runtime folder (kernels started at once, as a sweep's
    workers start them, must not pick the same socket files)."""
    import uuid

    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets.config import Config

    if os.name != "posix":
        return Config()
    runtime = Path(jupyter_runtime_dir())
    runtime.mkdir(parents=True, exist_ok=True)
    sockets = runtime / f"papermill-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    return Config({"KernelManager": {"transport": "ipc", "ip": str(sockets)}})


def plain_progress() -> contextlib.AbstractContextManager[None]:
    """Kernels started inside this block print progress as plain periodic lines (set it once
    around threads that start kernels concurrently, so they do not race on os.environ)."""
    return _environment(FORGETTING_PLAIN_PROGRESS="1")


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables (inherited by the kernel) for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def project_root(start: str | Path | None = None) -> Path | None:
    """The project root a kernel started in `start` (default: the current folder) works in: the
    parent of the nearest enclosing folder named `notebooks` (None outside any)."""
    start = Path(start or Path.cwd()).resolve()
    return next((f.parent for f in (start, *start.parents) if f.name == "notebooks"), None)


def setup() -> None:
    """What every notebook's setup cell calls after `runtime.configure()`: figures that survive
    saving (see the module docstring), and the kernel moved to the project root when it started
    inside `notebooks/` (JupyterLab starts kernels beside the notebook), so relative paths mean
    the same in JupyterLab, in papermill and on the command line."""
    import plotly.io as pio

    pio.renderers.default = PLOTLY_RENDERER
    root = project_root()
    if root is not None:
        os.chdir(root)
