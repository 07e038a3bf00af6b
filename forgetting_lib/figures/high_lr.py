"""high_lr: lowering the LR versus replay at a high LR, on pure train-step time (the paper's Fig. 5):
replay at the highest LR reaches the best low-LR old-data loss many times sooner. Its table, claim
checks, plot, and the paper's numbers.

Paper: English checkpoint (old loss ~3.63) finetuned on Spanish to 3.3; x = pure train-step time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go

from ..engine import regularisers
from . import analysis


def _replaces(reg_methods: pd.Series) -> pd.Series:
    """Whether each run's reg.method replaces a fraction of every batch by replay rows."""
    return reg_methods.map(lambda name: regularisers.get(name).coeff_is_fraction)


PAPER = {
    "old_loss_start": 3.63,
    "best_low_lr": 1e-5,
    "best_low_lr_old_loss": 3.639,
    "best_low_lr_time_s": 108.6,
    "replay_lr": 1e-3,
    "replay_fraction": (1 / 64, 1 / 32),
    "replay_time_s": 2.9,
    "speedup": 38.0,
    "claim": ">= 1/32 replay ends below the starting old loss",
}


def table(lr_df: pd.DataFrame, replay_df: pd.DataFrame, target: float) -> pd.DataFrame:
    """Both sweeps at the new-task target: LR, replayed fraction, old-data loss, forgetting and
    the pure train-step time it took (interpolated at the target crossing)."""
    parts = []
    for sweep_name, df in (("A: lower LR", lr_df), ("B: replay at high LR", replay_df)):
        t = analysis.forgetting_table(df, target)
        parts.append(
            pd.DataFrame(
                {
                    "sweep": sweep_name,
                    "lr": t["opt.lr"].astype(float),
                    "replay_fraction": np.where(
                        _replaces(t["reg.method"]), t["reg.coeff"].astype(float), 0.0
                    ),
                    "old_loss": t["old_loss"],
                    "forgetting": t["forgetting"],
                    "train_time_s": t["train_time_s"],
                    "steps": t["steps"],
                    "reached_target": t["reached"],
                }
            )
        )
    return pd.concat(parts).sort_values(["sweep", "lr", "replay_fraction"], ascending=[True, False, True])


def claims(table: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """Replay at the highest LR reaches the old-data loss of the best low-LR run (the lowest
    old loss of sweep A at the target) in >= 10x less pure train time."""
    a = table[table["sweep"].str.startswith("A") & table["reached_target"]]
    b = table[table["sweep"].str.startswith("B") & table["reached_target"]]
    if a.empty or b.empty:
        return {"both sweeps reach the target": (False, f"{len(a)} A runs, {len(b)} B runs did")}
    best = a.loc[a["old_loss"].idxmin()]
    good = b[b["old_loss"] <= best["old_loss"]]
    if good.empty:
        return {
            "replay reaches the best low-LR old loss": (
                False,
                f"best low-LR (LR {best['lr']:g}) old loss {best['old_loss']:.3f}; replay runs: "
                + ", ".join(f"{r.replay_fraction:g}: {r.old_loss:.3f}" for r in b.itertuples()),
            )
        }
    fastest = good.loc[good["train_time_s"].idxmin()]
    ratio = best["train_time_s"] / fastest["train_time_s"]
    return {
        "replay at the highest LR is >= 10x faster to the best low-LR old loss": (
            bool(ratio >= 10),
            f"{ratio:.1f}x: LR {best['lr']:g} takes {best['train_time_s']:.1f} s to old "
            f"loss {best['old_loss']:.3f}; LR {fastest['lr']:g} with "
            f"{fastest['replay_fraction']:g} replay {fastest['train_time_s']:.2f} s "
            f"to {fastest['old_loss']:.3f} (paper: {PAPER['speedup']:.0f}x)",
        )
    }


def plot(lr_df: pd.DataFrame, replay_df: pd.DataFrame, table: pd.DataFrame, target: float) -> go.Figure:
    """Old-data loss against pure train-step time (log) for both sweeps, each run up to where it
    reaches the new-task target (marked); the dotted line is the best low-LR run's old loss."""
    fig = go.Figure()
    blues, reds = plotly.colors.sequential.Blues[3:], plotly.colors.sequential.Reds[3:]
    for df, colours, label in ((lr_df, blues, "LR {lr:g}"), (replay_df, reds, "LR {lr:g} + {frac:g} replay")):
        runs = [frame.sort_values("step") for _, frame in df.groupby("run")]
        fractions = [
            float(f["reg.coeff"].iloc[0]) if _replaces(f["reg.method"]).iloc[0] else 0.0 for f in runs
        ]
        order = sorted(range(len(runs)), key=lambda k: (-float(runs[k]["opt.lr"].iloc[0]), fractions[k]))
        for i, k in enumerate(order):  # highest LR / least replay first, lightest colour
            frame = runs[k][runs[k]["train_time_s"] > 0]
            if frame.empty:
                continue
            name = label.format(lr=float(frame["opt.lr"].iloc[0]), frac=fractions[k])
            fig.add_trace(
                go.Scatter(
                    x=frame["train_time_s"],
                    y=frame["prev_ntp"],
                    mode="lines+markers",
                    name=name,
                    line=dict(color=colours[i % len(colours)]),
                )
            )
    reached = table[table["reached_target"]]
    fig.add_trace(
        go.Scatter(
            x=reached["train_time_s"],
            y=reached["old_loss"],
            mode="markers",
            name=f"at new-task loss {target:g}",
            marker=dict(symbol="star", size=13, color="black"),
        )
    )
    a = reached[reached["sweep"].str.startswith("A")]
    if len(a):
        fig.add_hline(
            y=float(np.min(a["old_loss"])),
            line_dash="dot",
            line_color="grey",
            annotation_text="best low-LR old loss",
        )
    fig.update_xaxes(type="log", title_text="pure train-step time, s")
    fig.update_yaxes(title_text="old-data (English) loss, nats/token")
    fig.update_layout(
        template="plotly_white",
        width=1000,
        height=550,
        title="high_lr: replay at a high LR beats lowering the LR, in a fraction of the time",
    )
    return fig
