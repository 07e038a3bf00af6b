"""Plotly figures of the paper's figures: tidy DataFrames and `figures` tables in, a Figure out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

COLOURS = plotly.colors.qualitative.Plotly


def method_comp(df: pd.DataFrame, table: pd.DataFrame, target: float | None) -> go.Figure:
    """Left: old-data loss against new-data loss along every method's finetuning run (a run moves
    right to left as it learns; lower = less forgetting). Right: forgetting relative to standard
    finetuning at the target, ours beside the paper's."""
    fig = make_subplots(1, 2, column_widths=[0.6, 0.4], subplot_titles=(
        "Old-data vs new-data loss while finetuning", "Forgetting relative to standard finetuning"))
    for i, method in enumerate(table.index):
        run = df[df["axis.method"] == method].sort_values("step")
        fig.add_trace(go.Scatter(x=run["valid_ntp"], y=run["prev_ntp"], mode="lines+markers",
                                 name=method, legendgroup=method, line=dict(color=COLOURS[i % len(COLOURS)])),
                      1, 1)
    if target is not None:
        fig.add_vline(x=target, line_dash="dot", line_color="grey", annotation_text="target", row=1, col=1)
    fig.add_trace(go.Bar(x=list(table.index), y=table["vs_standard"], name="ours", marker_color="#1f77b4",
                         text=["" if r else "best" for r in table["reached_target"]],
                         textposition="outside", hovertext="best: never reached the target; read at "
                                                           "its best new-task loss"), 1, 2)
    fig.add_trace(go.Bar(x=list(table.index), y=table["paper_vs_standard"], name="paper",
                         marker_color="#bbbbbb"), 1, 2)
    fig.update_xaxes(title_text="new-data (Spanish) loss, nats/token", autorange="reversed", row=1, col=1)
    fig.update_yaxes(title_text="old-data (English) loss, nats/token", row=1, col=1)
    fig.update_yaxes(title_text="forgetting / forgetting of standard", row=1, col=2)
    fig.update_layout(template="plotly_white", barmode="group", width=1200, height=500,
                      title="method_comp: replay stops forgetting; self-generated replay is as good as real")
    return fig


def learning_rate(table: pd.DataFrame) -> go.Figure:
    """Forgetting, steps to the target, and LR x steps against the finetuning LR (log axes), one
    line per pretraining LR and regulariser."""
    fig = make_subplots(1, 3, subplot_titles=("Forgetting at the target", "Steps to the target",
                                              "LR x steps"))
    groups = list(table.groupby(["pretrain_lr", "reg"], sort=True))
    for i, ((plr, reg), runs) in enumerate(groups):
        runs = runs.sort_values("ft_lr")
        style = dict(color=COLOURS[i % len(COLOURS)], dash="solid" if reg == "none" else "dash")
        name = f"pretrain LR {plr:g}, {reg}"
        for col, y in enumerate(("forgetting", "steps", "lr_x_steps"), start=1):
            fig.add_trace(go.Scatter(x=runs["ft_lr"], y=runs[y], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1, line=style), 1, col)
    fig.update_xaxes(type="log", title_text="finetuning LR")
    fig.update_yaxes(title_text="forgetting, nats/token", row=1, col=1)
    fig.update_yaxes(type="log", title_text="steps", row=1, col=2)
    fig.update_yaxes(type="log", title_text="LR x steps", row=1, col=3)
    fig.update_layout(template="plotly_white", width=1300, height=450,
                      title="learning_rate: lower LRs forget less but need ~1/LR more steps; KL forgets less at every LR")
    return fig


def high_lr(lr_df: pd.DataFrame, replay_df: pd.DataFrame, table: pd.DataFrame, target: float) -> go.Figure:
    """Old-data loss against pure train-step time (log) for both sweeps, each run up to where it
    reaches the new-task target (marked); the dotted line is the best low-LR run's old loss."""
    fig = go.Figure()
    blues, reds = plotly.colors.sequential.Blues[3:], plotly.colors.sequential.Reds[3:]
    for df, colours, label in ((lr_df, blues, "LR {lr:g}"), (replay_df, reds, "LR {lr:g} + {frac:g} replay")):
        runs = [frame.sort_values("step") for _, frame in df.groupby("run")]
        fractions = [float(f["reg.coeff"].iloc[0]) if f["reg.method"].iloc[0] == "replace" else 0.0 for f in runs]
        order = sorted(range(len(runs)), key=lambda k: (-float(runs[k]["opt.lr"].iloc[0]), fractions[k]))
        for i, k in enumerate(order):  # highest LR / least replay first, lightest colour
            frame = runs[k][runs[k]["train_time_s"] > 0]
            if frame.empty:
                continue
            name = label.format(lr=float(frame["opt.lr"].iloc[0]), frac=fractions[k])
            fig.add_trace(go.Scatter(x=frame["train_time_s"], y=frame["prev_ntp"], mode="lines+markers",
                                     name=name, line=dict(color=colours[i % len(colours)])))
    reached = table[table["reached_target"]]
    fig.add_trace(go.Scatter(x=reached["train_time_s"], y=reached["old_loss"], mode="markers",
                             name=f"at new-task loss {target:g}",
                             marker=dict(symbol="star", size=13, color="black")))
    a = reached[reached["sweep"].str.startswith("A")]
    if len(a):
        fig.add_hline(y=float(np.min(a["old_loss"])), line_dash="dot", line_color="grey",
                      annotation_text="best low-LR old loss")
    fig.update_xaxes(type="log", title_text="pure train-step time, s")
    fig.update_yaxes(title_text="old-data (English) loss, nats/token")
    fig.update_layout(template="plotly_white", width=1000, height=550,
                      title="high_lr: replay at a high LR beats lowering the LR, in a fraction of the time")
    return fig
