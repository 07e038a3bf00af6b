"""method_comp: one parent finetuned on a new distribution with every method, compared at equal
new-task loss (the paper's Fig. 3 left). Its table (ours beside the paper's), claim checks, plot,
and the paper's numbers.

Paper: 205M model (D=1024, L=16), FineWeb-Edu -> Nemotron-CC-Math, FT LR 1e-5. Forgetting = the
old-data loss increase over the start (2.224); every run at math loss ~1.37.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..methods import METHODS
from . import analysis
from .common import COLOURS

PAPER = {
    "old_loss_start": 2.224,
    "forgetting": {
        "standard": 0.113,
        "lora_r16": 0.140,
        "ntp_real": 0.005,
        "ntp_self": 0.006,
        "kl_real": 0.003,
        "kl_self": 0.003,
    },
    "new_loss": {
        "standard": 1.37,
        "lora_r16": 1.45,
        "ntp_real": 1.37,
        "ntp_self": 1.37,
        "kl_real": 1.37,
        "kl_self": 1.37,
    },
}


def table(df: pd.DataFrame, target: float | None, pretrain: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per method: new/old loss and forgetting at the new-task `target` (or at the best new loss
    for runs that never reach it, and for every run when `target` is None), forgetting relative
    to standard finetuning, and the paper's. Given the parent's pretraining run (`pretrain`, one
    run), also the compute multiplier: the fraction of pretraining whose English loss survives."""
    t = analysis.forgetting_table(df, target).set_index("axis.method")
    t = t.loc[[m for m in METHODS if m in t.index] + [m for m in t.index if m not in METHODS]]
    ref = PAPER["forgetting"]
    out = pd.DataFrame(
        {
            "new_loss": t["new_loss"],
            "old_loss": t["old_loss"],
            "forgetting": t["forgetting"],
            "vs_standard": t["forgetting"] / t.loc["standard", "forgetting"]
            if "standard" in t.index
            else np.nan,
            "reached_target": t["reached"],
            "tokens": t["tokens"],
            "paper_forgetting": [ref.get(m, np.nan) for m in t.index],
            "paper_vs_standard": [ref.get(m, np.nan) / ref["standard"] for m in t.index],
        }
    )
    if pretrain is not None:
        out["compute_multiplier"] = [analysis.compute_multiplier(pretrain, x) for x in t["old_loss"]]
    return out.rename_axis("method")


def claims(table: pd.DataFrame, df: pd.DataFrame | None = None) -> dict[str, tuple[bool, str]]:
    """The issue's acceptance checks on `table`. LoRA usually never reaches the
    target, so (given the runs `df`) it is compared with standard finetuning read at LoRA's best
    new-task loss: equal new-task performance."""
    f, reached = table["forgetting"], table["reached_target"]
    out = {}

    def at_target(*methods: str) -> str:  # why a comparison is void: a run off the target
        off = [m for m in methods if not reached[m]]
        return f"not at the target: {', '.join(off)}; " if off else ""

    if {"standard", "kl_self"} <= set(f.index):
        why = at_target("standard", "kl_self")
        out["KL self forgets <= 1/4 of standard"] = (
            not why and bool(f["kl_self"] <= 0.25 * f["standard"]),
            f"{why}{f['kl_self']:.3f} vs {f['standard']:.3f}",
        )
    if {"standard", "kl_self", "kl_real"} <= set(f.index):
        gap, why = abs(f["kl_self"] - f["kl_real"]), at_target("standard", "kl_self", "kl_real")
        out["|KL self - KL real| <= 0.1 x standard"] = (
            not why and bool(gap <= 0.1 * f["standard"]),
            f"{why}{gap:.3f} vs {0.1 * f['standard']:.3f}",
        )
    if {"standard", "lora_r16"} <= set(f.index):
        level, ref = table.loc["lora_r16", "new_loss"], f["standard"]
        if df is not None:
            std = analysis.forgetting_table(df[df["axis.method"] == "standard"], level)
            ref = float(std["forgetting"].iloc[0]) if bool(std["reached"].iloc[0]) else ref
        out["LoRA forgets at least ~as much as standard at equal new-task loss"] = (
            bool(f["lora_r16"] >= 0.9 * ref),
            f"{f['lora_r16']:.3f} vs standard {ref:.3f} at new-task loss {level:.3f}",
        )
    return out


def plot(df: pd.DataFrame, table: pd.DataFrame, target: float | None) -> go.Figure:
    """Left: old-data loss against new-data loss along every method's finetuning run (a run moves
    right to left as it learns; lower = less forgetting). Right: forgetting relative to standard
    finetuning at the target, ours beside the paper's."""
    fig = make_subplots(
        1,
        2,
        column_widths=[0.6, 0.4],
        subplot_titles=(
            "Old-data vs new-data loss while finetuning",
            "Forgetting relative to standard finetuning",
        ),
    )
    for i, method in enumerate(table.index):
        run = df[df["axis.method"] == method].sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=run["valid_ntp"],
                y=run["prev_ntp"],
                mode="lines+markers",
                name=method,
                legendgroup=method,
                line=dict(color=COLOURS[i % len(COLOURS)]),
            ),
            1,
            1,
        )
    if target is not None:
        fig.add_vline(x=target, line_dash="dot", line_color="grey", annotation_text="target", row=1, col=1)
    fig.add_trace(
        go.Bar(
            x=list(table.index),
            y=table["vs_standard"],
            name="ours",
            marker_color="#1f77b4",
            text=["" if r else "best" for r in table["reached_target"]],
            textposition="outside",
            hovertext="best: never reached the target; read at its best new-task loss",
        ),
        1,
        2,
    )
    fig.add_trace(
        go.Bar(x=list(table.index), y=table["paper_vs_standard"], name="paper", marker_color="#bbbbbb"), 1, 2
    )
    fig.update_xaxes(title_text="new-data (Spanish) loss, nats/token", autorange="reversed", row=1, col=1)
    fig.update_yaxes(title_text="old-data (English) loss, nats/token", row=1, col=1)
    fig.update_yaxes(title_text="forgetting / forgetting of standard", row=1, col=2)
    fig.update_layout(
        template="plotly_white",
        barmode="group",
        width=1200,
        height=500,
        title="method_comp: replay stops forgetting; self-generated replay is as good as real",
    )
    return fig
