"""2d_grid: forgetting over model size x pretraining length (the figure `2d_grid`).

Every (width, tokens per parameter) cell is pretrained (cosine schedule) and finetuned to one
new-task loss twice: without regularisation and with KL replay on real old rows. Heatmaps of
forgetting and of the compute multiplier (the fraction of pretraining whose old-data loss
survives) show both capacity effects at once.

Paper: 13 widths (5.8M-32M) x 13 TPP (20..1280), FineWeb-Edu -> math to loss 2.2, LR 1e-4, KL
coefficient 10 on real rows: no regularisation forgets 0.35 nats at (5.8M, 20 TPP) down to ~0.05
at 32M, multiplier ~0.5 for <= 9M and 0.65-0.74 for >= 21M; KL < 0.01 nats and multiplier >= 0.86
everywhere.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import analysis

SIZE, LENGTH = "D", "tpp"  # the pretraining stage's axes: model.D and a named axis of TPP labels
NONE, KL = "standard", "kl_real"  # the finetuning stage's method axis


def table(finetune: pd.DataFrame, pretrain: pd.DataFrame, target: float) -> pd.DataFrame:
    """One row per (width, TPP, method): forgetting at the new-task `target`, whether it got
    there, and the compute multiplier against that cell's own pretraining run."""
    t = analysis.forgetting_table(finetune, target)
    curves = {
        (str(d), str(x)): run
        for (d, x), run in pretrain.groupby([f"axis.{SIZE}", f"axis.{LENGTH}"], sort=False)
    }
    rows = []
    for _, r in t.iterrows():
        cell = (str(r[f"axis.pretrain.{SIZE}"]), str(r[f"axis.pretrain.{LENGTH}"]))
        rows.append(
            {
                "D": int(cell[0]),
                "tpp": float(cell[1]),
                "method": r["axis.method"],
                "forgetting": r["forgetting"],
                "reached_target": r["reached"],
                "multiplier": analysis.compute_multiplier(curves[cell], r["old_loss"]),
                "old_pretrained": r["baseline"],
            }
        )
    return pd.DataFrame(rows).sort_values(["method", "D", "tpp"]).set_index(["method", "D", "tpp"])


def heatmap(table: pd.DataFrame, method: str, value: str) -> pd.DataFrame:
    """`value` of one method as a [width x TPP] grid (rows: D ascending, columns: TPP)."""
    return table.loc[method][value].unstack("tpp").sort_index()


def adjacent_pairs(grid: pd.DataFrame) -> tuple[int, int, int, int]:
    """(pairs where forgetting falls with width, width pairs, pairs where it rises with TPP, TPP
    pairs) over the grid's adjacent cells."""
    g = grid.to_numpy(float)
    down = np.diff(g, axis=0)  # [D - 1, TPP]: larger width minus smaller
    right = np.diff(g, axis=1)  # [D, TPP - 1]: longer minus shorter
    return int((down < 0).sum()), down.size, int((right > 0).sum()), right.size


def claims(table: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """Without regularisation forgetting falls with width and rises with TPP in >= 80% of adjacent
    cell pairs; KL forgets less than no regularisation in every cell and its compute multiplier
    is at least as high in every cell; every run reached the target."""
    none, kl = heatmap(table, NONE, "forgetting").align(heatmap(table, KL, "forgetting"))  # a missing
    m_none, m_kl = heatmap(table, NONE, "multiplier").align(heatmap(table, KL, "multiplier"))  # cell: NaN
    falls, n_size, rises, n_length = adjacent_pairs(none)
    share = (falls + rises) / max(n_size + n_length, 1)
    kl_below = (kl < none).to_numpy()  # NaN compares False: a missing cell fails the claim
    m_ok = (m_kl >= m_none).to_numpy()
    off = table[~table["reached_target"]]
    return {
        "every finetune reached the target": (
            off.empty,
            "all did"
            if off.empty
            else "missed: " + ", ".join(f"{m} D={d} TPP={x:g}" for m, d, x in off.index),
        ),
        "no regularisation: forgetting falls with width and rises with TPP in >= 80% of adjacent pairs": (
            share >= 0.8,
            f"{falls}/{n_size} width pairs, {rises}/{n_length} TPP pairs: {share:.0%}",
        ),
        "KL forgets less than no regularisation in every cell": (
            bool(kl_below.all()),
            f"{int(kl_below.sum())}/{kl_below.size} cells; KL at most {np.nanmax(kl.to_numpy()):.3f}, "
            f"none at least {np.nanmin(none.to_numpy()):.3f}",
        ),
        "KL's compute multiplier >= no regularisation's in every cell": (
            bool(m_ok.all()),
            f"{int(m_ok.sum())}/{m_ok.size} cells; KL at least {np.nanmin(m_kl.to_numpy()):.2f}, none "
            f"{np.nanmin(m_none.to_numpy()):.2f}..{np.nanmax(m_none.to_numpy()):.2f}",
        ),
    }


def plot(table: pd.DataFrame) -> go.Figure:
    """Four heatmaps, width (rows) x TPP (columns): forgetting and compute multiplier, without
    regularisation and with KL replay."""
    fig = make_subplots(
        2,
        2,
        subplot_titles=(
            "forgetting, no regularisation",
            "forgetting, KL replay (real rows)",
            "compute multiplier, no regularisation",
            "compute multiplier, KL replay (real rows)",
        ),
        horizontal_spacing=0.12,
        vertical_spacing=0.14,
    )
    forgetting = [heatmap(table, m, "forgetting") for m in (NONE, KL)]
    fmax = max(float(np.nanmax(g.to_numpy())) for g in forgetting)
    for col, method in enumerate((NONE, KL), 1):
        for row, (value, zmin, zmax, scale) in enumerate(
            (("forgetting", 0.0, fmax, "Reds"), ("multiplier", 0.0, 1.0, "Blues")), 1
        ):
            grid = heatmap(table, method, value)
            fig.add_trace(
                go.Heatmap(
                    z=grid.to_numpy(),
                    x=[f"{x:g}" for x in grid.columns],
                    y=[str(d) for d in grid.index],
                    zmin=zmin,
                    zmax=zmax,
                    colorscale=scale,
                    text=np.round(grid.to_numpy(), 3),
                    texttemplate="%{text}",
                    showscale=col == 2,
                    colorbar=dict(len=0.42, y=0.79 if row == 1 else 0.21),
                ),
                row,
                col,
            )
    fig.update_xaxes(title_text="pretraining tokens per parameter", type="category")
    fig.update_yaxes(title_text="width D", type="category")
    fig.update_layout(
        template="plotly_white", width=1100, height=800, title="2d_grid: forgetting over model size x TPP"
    )
    return fig
