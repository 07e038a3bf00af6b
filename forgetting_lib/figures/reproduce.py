"""`reproduce`: the data notebooks, then every figure notebook at one scale, through papermill."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..experiments.notebooks import run_notebooks

FIGURES = (
    "1d_regression",
    "method_comp",
    "instruct",
    "learning_rate",
    "high_lr",
    "toy_continual",
    "replay_diagnostics",
    "model_size",
    "pretrain_length",
    "model_capacity",
    "2d_grid",
)
DATA_NOTEBOOKS = ("01_tokenizer", "02_binarize")  # the token files every LM figure trains on


def reproduce(
    scale: str = "quick",
    figures: Sequence[str] | None = None,
    out: str | Path = "outputs/figures",
    params_dir: str | Path = "params",
) -> dict[str, Any]:
    """Run the data notebooks (01-02) and each figure notebook `notebooks/figures/<name>.ipynb`
    with `params/<scale>/<name>.yaml`; executed notebooks go to `<out>/<scale>/notebooks/`, wall
    times to `<out>/<scale>/timings.json`. A failing figure is reported and the others still run;
    returns {notebook: seconds or "failed: ..."}."""
    folder = Path(out) / scale
    names = [*DATA_NOTEBOOKS, *(f"figures/{name}" for name in (figures or FIGURES))]
    return run_notebooks(
        names,
        Path(params_dir) / scale,
        folder / "notebooks",
        keep_going=True,
        timings=folder / "timings.json",
    )
