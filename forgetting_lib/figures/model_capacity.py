"""model_capacity (the paper's Fig. 1): is forgetting lower-bounded by capacity?

Left: one width pretrained far past saturation on the old data with a fraction of the new data
mixed into every batch, one run per fraction: their final (new loss, old loss) points trace the
Pareto frontier of what that capacity can hold of both. Right: an overtrained checkpoint (old
data only, as long as the frontier runs) finetuned on the new data with self-generated KL
replay over a swept coefficient cannot cross that frontier: keeping more old loss costs new
loss. A 20-TPP checkpoint of the same width, with spare capacity, learns the new data at about
constant old loss.

Paper: a 5.8M model, 13 mix fractions 1/128..127/128 for 10 epochs (~17K TPP); self-generated
KL (replay batch 64, buffer 16), LR 1e-4 cosine, coefficient 0.01..10.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import analysis
from .common import COLOURS

EPSILON = 0.02  # nats/token: how far below the frontier a finetuned point may lie (evaluation noise)
DELTA = 0.05  # nats/token: "about constant" old loss for the 20-TPP model at the target
PARENT_AXIS = "tpp"  # the pretrain stage's axis (tokens per parameter): the longest is the
# overtrained checkpoint, the shortest the ~20-TPP (Chinchilla) one
OVERTRAINED, CHINCHILLA = "overtrained", "20 TPP"


def roles(labels: pd.Series) -> pd.Series:
    """Parent TPP labels as roles: the longest OVERTRAINED, the shortest CHINCHILLA."""
    tpp = labels.astype(float)
    return tpp.map(
        lambda x: OVERTRAINED if x == tpp.max() else CHINCHILLA if x == tpp.min() else f"{x:g} TPP"
    )


def frontier(pretrain: pd.DataFrame) -> pd.DataFrame:
    """The mix-fraction runs' final points: `fraction`, `new_loss` (mix_ntp), `old_loss`
    (valid_ntp), `on_frontier` (no other run is lower in both), sorted by new loss."""
    last = analysis.final_rows(pretrain)
    points = pd.DataFrame(
        {
            "fraction": last["mix.fraction"].astype(float).to_numpy(),
            "new_loss": last["mix_ntp"].astype(float).to_numpy(),
            "old_loss": last["valid_ntp"].astype(float).to_numpy(),
            "tokens": last["tokens"].astype(float).to_numpy(),
        }
    )
    pareto = analysis.pareto_frontier(points, "new_loss", "old_loss")
    points["on_frontier"] = points.index.isin(pareto.index)
    return points.sort_values("new_loss").reset_index(drop=True)


def frontier_old_loss(front: pd.DataFrame, new_loss: np.ndarray) -> np.ndarray:
    """The frontier's old loss at each `new_loss`, linear between its Pareto points; NaN outside
    their new-loss range (nothing was measured there)."""
    pts = front[front["on_frontier"]].sort_values("new_loss")
    xs, ys = pts["new_loss"].to_numpy(), pts["old_loss"].to_numpy()
    out = np.interp(new_loss, xs, ys)
    return np.where((new_loss < xs.min()) | (new_loss > xs.max()), np.nan, out)


def finetune_points(finetune: pd.DataFrame, front: pd.DataFrame) -> pd.DataFrame:
    """Every evaluation of every finetune: parent, coefficient, new/old loss, and `below` = how far
    the point lies below the frontier (frontier old loss - old loss; NaN outside its range)."""
    df = finetune.sort_values(["run", "step"], kind="stable")
    new, old = df["valid_ntp"].to_numpy(float), df["prev_ntp"].to_numpy(float)
    return pd.DataFrame(
        {
            "parent": roles(df[f"axis.pretrain.{PARENT_AXIS}"]).to_numpy(),
            "coeff": df["reg.coeff"].astype(float).to_numpy(),
            "run": df["run"].to_numpy(),
            "tokens": df["tokens"].to_numpy(),
            "new_loss": new,
            "old_loss": old,
            "below": frontier_old_loss(front, new) - old,
        }
    )


def table(finetune: pd.DataFrame, target: float) -> pd.DataFrame:
    """Per finetune (parent x coefficient): old-data loss at the start and where the new-task loss
    reaches `target` (or its best), forgetting, and whether it got there."""
    t = analysis.forgetting_table(finetune, target)
    out = pd.DataFrame(
        {
            "parent": roles(t[f"axis.pretrain.{PARENT_AXIS}"]),
            "coeff": t["reg.coeff"].astype(float),
            "old_start": t["baseline"],
            "new_loss": t["new_loss"],
            "old_loss": t["old_loss"],
            "forgetting": t["forgetting"],
            "reached_target": t["reached"],
            "tokens": t["tokens"],
        }
    )
    return out.sort_values(["parent", "coeff"]).set_index(["parent", "coeff"])


def claims(front: pd.DataFrame, points: pd.DataFrame, table: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """No finetuned point of the overtrained model lies more than EPSILON below the frontier; the
    20-TPP model reaches the target with old loss within DELTA of its start."""
    over = points[points["parent"] == OVERTRAINED]
    inside = over[over["below"].notna()]
    worst = inside.loc[inside["below"].idxmax()] if len(inside) else None
    out = {
        f"no finetuned point of the overtrained model lies > {EPSILON} below the frontier": (
            worst is not None and bool(worst["below"] <= EPSILON),
            "no point within the frontier's new-loss range"
            if worst is None
            else f"at most {worst['below']:+.3f} below (coefficient {worst['coeff']:g}, new loss "
            f"{worst['new_loss']:.3f}); {len(inside)} of {len(over)} points within the frontier's range",
        )
    }
    if CHINCHILLA in table.index.get_level_values("parent"):
        chin = table.loc[CHINCHILLA]
        hit = chin[chin["reached_target"]]
        best = hit.loc[hit["forgetting"].abs().idxmin()] if len(hit) else None
        over_hit = table.loc[OVERTRAINED] if OVERTRAINED in table.index.get_level_values("parent") else None
        over_best = (
            over_hit[over_hit["reached_target"]]["forgetting"].min() if over_hit is not None else np.nan
        )
        out[f"the 20-TPP model reaches the target with old loss within {DELTA} of its start"] = (
            best is not None and bool(abs(best["forgetting"]) <= DELTA),
            "no run at the target"
            if best is None
            else f"{best['forgetting']:+.3f} (coefficient {hit['forgetting'].abs().idxmin():g}); "
            f"the overtrained model at the target: {over_best:+.3f} at best",
        )
    return out


def plot(front: pd.DataFrame, points: pd.DataFrame) -> go.Figure:
    """Left: the mix-fraction runs and their Pareto frontier. Right: the frontier with every
    finetune's trajectory, overtrained (solid) and 20-TPP (dashed), one colour per coefficient."""
    fig = make_subplots(
        1, 2, subplot_titles=("Pretraining with new data mixed in", "Finetuning against the frontier")
    )
    pareto = front[front["on_frontier"]]
    for col in (1, 2):
        fig.add_trace(
            go.Scatter(
                x=pareto["new_loss"],
                y=pareto["old_loss"],
                mode="lines",
                name="frontier",
                line=dict(color="black"),
                showlegend=col == 1,
            ),
            1,
            col,
        )
    fig.add_trace(
        go.Scatter(
            x=front["new_loss"],
            y=front["old_loss"],
            mode="markers+text",
            text=[f"{f:g}" for f in front["fraction"]],
            textposition="top right",
            name="mix fraction",
            marker=dict(color="black"),
        ),
        1,
        1,
    )
    coeffs = sorted(points["coeff"].unique())
    for _, run_points in points.groupby("run", sort=False):
        parent, coeff = run_points["parent"].iloc[0], run_points["coeff"].iloc[0]
        fig.add_trace(
            go.Scatter(
                x=run_points["new_loss"],
                y=run_points["old_loss"],
                mode="lines+markers",
                name=f"{parent}, coeff {coeff:g}",
                line=dict(
                    color=COLOURS[coeffs.index(coeff) % len(COLOURS)],
                    dash="solid" if parent == OVERTRAINED else "dash",
                ),
            ),
            1,
            2,
        )
    fig.update_xaxes(title_text="new-data loss, nats/token", autorange="reversed")
    fig.update_yaxes(title_text="old-data loss, nats/token")
    fig.update_layout(
        template="plotly_white",
        width=1200,
        height=520,
        title="model_capacity: an overtrained model cannot cross its capacity frontier",
    )
    return fig
