"""Figure of the 1-D regression illustration: `regression1d.run(...)` results -> plotly Figure."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PANELS = {
    "before": "before (SGHMC, old points)",
    "new_only": "new points only",
    "with_kl": "new points + KL on old x",
}
OLD_COLOR, NEW_COLOR, FIT_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"


def predictions(
    results: Mapping[str, Any],
    *,
    title: str = "Ensemble predictive (mean ± 2 std) before and after adaptation",
) -> go.Figure:
    """Three panels (before, new only, with KL): the ensemble mean with a ±2 std band (std of
    the moment-matched predictive, ensemble + noise), the noise-free target (dotted), the old
    and new training points, and each panel's RMSEs on the old and new regions in its title."""
    rmse, grid, data, cfg = results["rmse"], results["grid"], results["data"], results["config"]
    titles = [
        f"{label}<br>RMSE old {rmse['old'][name]:.3f}, new {rmse['new'][name]:.3f}"
        for name, label in PANELS.items()
    ]
    fig = make_subplots(rows=1, cols=len(PANELS), shared_yaxes=True, subplot_titles=titles)
    x = np.asarray(grid["x"])
    for col, name in enumerate(PANELS, start=1):
        mean, std = np.asarray(grid[name]["mean"]), np.asarray(grid[name]["std"])
        first = col == 1
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([x, x[::-1]]),
                y=np.concatenate([mean + 2 * std, (mean - 2 * std)[::-1]]),
                fill="toself",
                fillcolor="rgba(44,160,44,0.2)",
                line=dict(width=0),
                name="mean ± 2 std",
                legendgroup="band",
                showlegend=first,
                hoverinfo="skip",
            ),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=mean,
                mode="lines",
                line=dict(color=FIT_COLOR),
                name="ensemble mean",
                legendgroup="mean",
                showlegend=first,
            ),
            row=1,
            col=col,
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=grid["target"],
                mode="lines",
                name="target function",
                line=dict(color="grey", dash="dot"),
                legendgroup="target",
                showlegend=first,
            ),
            row=1,
            col=col,
        )
        for region, color in (("old", OLD_COLOR), ("new", NEW_COLOR)):
            fig.add_trace(
                go.Scatter(
                    x=data[f"x_{region}"],
                    y=data[f"y_{region}"],
                    mode="markers",
                    marker=dict(color=color, size=5),
                    name=f"{region} points",
                    legendgroup=region,
                    showlegend=first,
                ),
                row=1,
                col=col,
            )
            fig.add_vrect(
                x0=cfg[f"{region}_lo"],
                x1=cfg[f"{region}_hi"],
                fillcolor=color,
                opacity=0.06,
                line_width=0,
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="x", row=1, col=col)
    y = np.concatenate([data["y_old"], data["y_new"]])
    fig.update_yaxes(range=[y.min() - 1.5, y.max() + 1.5])
    fig.update_yaxes(title_text="y", row=1, col=1)
    fig.update_layout(
        title=title,
        template="plotly_white",
        height=480,
        margin=dict(t=110),
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0.5, xanchor="center"),
    )
    return fig
