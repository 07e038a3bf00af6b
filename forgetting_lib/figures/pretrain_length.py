"""pretrain_length: does longer pretraining increase forgetting? One width pretrained for a grid of
tokens per parameter (cosine schedule), each finetuned to one new-task loss with KL replay on
real old rows over a swept coefficient; per length the best old-data loss among runs at the target.

Paper: a 5.8M model on C4 English, TPP in {10, 31.6, 100, 316, 1000, 3162, 10000}, finetuned to
C4 Spanish loss 2.9: forgetting ~-0.005, 0.003, 0.076, 0.115, 0.147, 0.168, 0.181.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from . import analysis, capacity

AXIS = "tpp"  # the pretraining stage's grid axis: a named axis, label = tokens per parameter
PAPER = {
    "tokens_per_param": [10, 31.6, 100, 316, 1000, 3162, 10000],
    "forgetting": [-0.005, 0.003, 0.076, 0.115, 0.147, 0.168, 0.181],
}
NEAR_ZERO = 0.02  # nats/token: "near zero" at the lowest TPP (the paper: -0.005)


def table(finetune: pd.DataFrame, pretrain: pd.DataFrame, target: float, floor: float) -> pd.DataFrame:
    """Per pretraining length: the capacity slices (`capacity.parent_table`) beside the paper's
    forgetting at the same TPP where the paper has it."""
    t = capacity.parent_table(finetune, pretrain, target, AXIS, floor)
    paper = dict(zip(PAPER["tokens_per_param"], PAPER["forgetting"]))
    t["paper_forgetting"] = [paper.get(x, float("nan")) for x in t.index]
    return t


def claims(table: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """Forgetting rises with TPP (Spearman rho >= 0.8 over >= 5 lengths at the target) and is
    near zero at the lowest TPP."""
    reached = table[table["reached_target"]]
    rho = analysis.spearman(reached.index, reached["forgetting"])
    numbers = ", ".join(f"{x:g}: {f:.3f}" for x, f in zip(table.index, table["forgetting"]))
    lowest = table.iloc[0]
    return {
        "forgetting rises with TPP (Spearman rho >= 0.8, >= 5 lengths at the target)": (
            len(reached) >= 5 and len(reached) == len(table) and rho >= 0.8,
            f"rho {rho:.2f} over {len(reached)} lengths (TPP: forgetting {numbers})",
        ),
        f"near zero (|forgetting| <= {NEAR_ZERO}) at the lowest TPP": (
            bool(lowest["reached_target"] and abs(lowest["forgetting"]) <= NEAR_ZERO),
            f"TPP {table.index[0]:g}: {lowest['forgetting']:+.3f}",
        ),
    }


def plot(table: pd.DataFrame) -> go.Figure:
    return capacity.band_plot(
        table,
        "tokens_per_param",
        "pretraining tokens per parameter",
        "pretrain_length: longer pretraining, more forgetting that replay cannot remove",
        {"x": PAPER["tokens_per_param"], "forgetting": PAPER["forgetting"]},
    )
