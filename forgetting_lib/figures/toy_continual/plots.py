"""Figures of the toy continual-learning runs: pure DataFrame -> plotly Figure functions.

Input is `runs.load_runs(...)` of the toy trainer's run folders (columns `run`, `step`, `acc_<task>`,
`tasks`, `steps_per_task`) or an accuracy matrix from `toy.accuracy_matrix`.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def accuracy_curves(df: pd.DataFrame, *, title: str = "Exact-match accuracy of every task") -> go.Figure:
    """One panel per run (e.g. standard, ntp_self), one line per task; dotted lines mark the task
    boundaries, labelled with the task trained after them."""
    names = list(dict.fromkeys(df["run"]))
    fig = make_subplots(rows=1, cols=len(names), shared_yaxes=True, subplot_titles=names)
    for col, name in enumerate(names, start=1):
        frame = df[df["run"] == name].sort_values("step")
        tasks, per_task = list(frame["tasks"].iloc[0]), int(frame["steps_per_task"].iloc[0])
        for i, task in enumerate(tasks):
            fig.add_trace(
                go.Scatter(
                    x=frame["step"],
                    y=100 * frame[f"acc_{task}"],
                    mode="lines",
                    name=task,
                    legendgroup=task,
                    showlegend=col == 1,
                    line=dict(color=COLORS[i % len(COLORS)]),
                ),
                row=1,
                col=col,
            )
        for i, task in enumerate(tasks):
            fig.add_vline(
                x=i * per_task,
                line=dict(dash="dot", color="grey"),
                row=1,
                col=col,
                annotation_text=task,
                annotation_position="top right",
            )
        fig.update_xaxes(title_text="training step", row=1, col=col)
    fig.update_yaxes(title_text="exact match (%)", range=[-2, 105], row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", legend_title="task", height=420)
    return fig


def accuracy_heatmap(matrix: pd.DataFrame, *, title: str = "Accuracy after each task") -> go.Figure:
    """acc[i, j] (%) as a heatmap: rows = after training task i, columns = evaluated task j."""
    z = 100 * matrix.to_numpy()
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(matrix.columns),
            y=list(matrix.index),
            zmin=0,
            zmax=100,
            colorscale="Viridis",
            text=[[f"{v:.1f}" for v in r] for r in z],
            texttemplate="%{text}",
            colorbar=dict(title="%"),
        )
    )
    fig.update_layout(
        title=title,
        template="plotly_white",
        xaxis_title="evaluated task",
        yaxis_title="after training",
        height=360,
        width=480,
    )
    fig.update_yaxes(autorange="reversed")
    return fig
