"""learning_rate: finetuning at a grid of learning rates from parents pretrained at two LRs, with and
without KL replay (the paper's Fig. 4): forgetting falls with the LR and levels off, steps grow
~1/LR. Its table, claim checks and plot.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import analysis
from .common import COLOURS


def table(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per finetuning run: pretraining LR, finetuning LR, method (the `method` axis), forgetting
    at the target, steps to it, LR x steps (constant when steps grow as 1/LR)."""
    t = analysis.forgetting_table(df, target)
    out = pd.DataFrame(
        {
            "pretrain_lr": t["axis.pretrain.lr"].astype(float),
            "ft_lr": t["opt.lr"].astype(float),
            "method": t["axis.method"],
            "forgetting": t["forgetting"],
            "old_loss": t["old_loss"],
            "steps": t["steps"],
            "lr_x_steps": analysis.lr_times_steps(t),
            "reached_target": t["reached"],
            "train_time_s": t["train_time_s"],
        }
    )
    return out.sort_values(["pretrain_lr", "method", "ft_lr"], ascending=[True, False, False])


def claims(table: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """Forgetting falls with the finetuning LR and levels off; steps grow ~1/LR; every replay method is
    below standard finetuning at every LR; a higher pretraining LR forgets less (the paper's ordering)."""
    out = {}
    off = table[~table["reached_target"].astype(bool)]
    out["every run reached the target"] = (
        off.empty,
        ", ".join(off.index.astype(str)) or f"{len(table)} runs",
    )
    table = table[table["reached_target"].astype(bool)]  # forgetting and steps mean nothing elsewhere
    standard = table[table["method"] == "standard"]
    for plr, runs in standard.groupby("pretrain_lr"):
        runs = runs.sort_values("ft_lr", ascending=False)
        f, ls = runs["forgetting"].to_numpy(), runs["lr_x_steps"].to_numpy()
        drops = -np.diff(f)
        out[f"pretrain LR {plr:g}: forgetting falls as the FT LR falls"] = (
            bool((drops > -0.05).all() and f[-1] < f[0]),
            " > ".join(f"{x:.3f}" for x in f),
        )
        out[f"pretrain LR {plr:g}: and levels off (last drop < half the first)"] = (
            bool(len(drops) >= 2 and drops[-1] < 0.5 * drops[0]),
            ", ".join(f"{x:.3f}" for x in drops),
        )
        out[f"pretrain LR {plr:g}: LR x steps within 2.5x across LRs"] = (
            bool(np.nanmax(ls) <= 2.5 * np.nanmin(ls)),
            ", ".join(f"{x:.3g}" for x in ls),
        )
    pivot = table.pivot_table(index=["pretrain_lr", "ft_lr"], columns="method", values="forgetting")
    for method in (m for m in pivot.columns if m != "standard" and "standard" in pivot.columns):
        below = pivot[method] < pivot["standard"]
        out[f"{method} forgets less than standard finetuning at every LR"] = (
            bool(below.all()),
            f"{int(below.sum())}/{len(below)} (pretrain LR, FT LR) pairs",
        )
    by_plr = standard.groupby("pretrain_lr")["forgetting"].mean()
    if len(by_plr) >= 2:
        out["higher pretraining LR forgets less (mean over FT LRs, standard finetuning)"] = (
            bool(by_plr.iloc[-1] < by_plr.iloc[0]),
            ", ".join(f"{k:g}: {v:.3f}" for k, v in by_plr.items()),
        )
    return out


def plot(table: pd.DataFrame) -> go.Figure:
    """Forgetting, steps to the target, and LR x steps against the finetuning LR (log axes), one
    line per pretraining LR and regulariser."""
    fig = make_subplots(
        1, 3, subplot_titles=("Forgetting at the target", "Steps to the target", "LR x steps")
    )
    groups = list(table.groupby(["pretrain_lr", "method"], sort=True))
    for i, ((plr, method), runs) in enumerate(groups):
        runs = runs.sort_values("ft_lr")
        style = dict(color=COLOURS[i % len(COLOURS)], dash="solid" if method == "standard" else "dash")
        name = f"pretrain LR {plr:g}, {method}"
        for col, y in enumerate(("forgetting", "steps", "lr_x_steps"), start=1):
            fig.add_trace(
                go.Scatter(
                    x=runs["ft_lr"],
                    y=runs[y],
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line=style,
                ),
                1,
                col,
            )
    fig.update_xaxes(type="log", title_text="finetuning LR")
    fig.update_yaxes(title_text="forgetting, nats/token", row=1, col=1)
    fig.update_yaxes(type="log", title_text="steps", row=1, col=2)
    fig.update_yaxes(type="log", title_text="LR x steps", row=1, col=3)
    fig.update_layout(
        template="plotly_white",
        width=1300,
        height=450,
        title="learning_rate: lower LRs forget less but need ~1/LR more steps; KL forgets less at every LR",
    )
    return fig
