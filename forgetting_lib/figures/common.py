"""What every figure notebook shares: its sweep spec, the completeness claim, claim tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import plotly.colors

from ..experiments.notebooks import PROJECT_ROOT

COLOURS = plotly.colors.qualitative.Plotly


def figure_params(name: str, scale: str = "quick") -> Path:
    """The parameter file of figure `name` at `scale`: `params/<scale>/<name>.yaml`."""
    return PROJECT_ROOT / "params" / scale / f"{name}.yaml"


def figure_spec(spec: Any, name: str, scale: str = "quick") -> Any:
    """A figure notebook's sweep spec, parsed once: `spec` (a mapping), or when None the `sweep:`
    of `params/<scale>/<name>.yaml`."""
    from ..experiments.sweep_spec import load_spec

    return load_spec(figure_params(name, scale) if spec is None else spec)


def completeness(spec: Any, stages: Sequence[str]) -> dict[str, tuple[bool, str]]:
    """A claim per stage: every point of it finished with the spec's config (tables and claims
    silently cover only finished points otherwise)."""
    from ..experiments.sweep import stage_status

    out = {}
    for stage in stages:
        s = stage_status(spec, stage)
        out[f"every {stage} point finished"] = (
            s["finished"] == s["points"],
            f"{s['finished']}/{s['points']}",
        )
    return out


def claims_frame(claims: dict[str, tuple[bool, str]]) -> pd.DataFrame:
    """A claim-check dict as a table for notebooks."""
    rows = [{"claim": k, "holds": v[0], "numbers": v[1]} for k, v in claims.items()]
    return pd.DataFrame(rows, columns=["claim", "holds", "numbers"]).set_index("claim")
