"""model_size: do larger models forget less? Widths pretrained to one old-data loss, each
finetuned to one new-task loss with KL replay on real old rows over a swept coefficient; per width
the best old-data loss among runs that reached the target (the paper's capacity slices).

Paper: D in {256, 384, 512, 640, 768}, L=6 (6 / 12 / 21 / 32 / 46M parameters), C4 English
pretrained to loss 3.0 at constant LR 1e-3, finetuned on C4 Spanish to 2.76 (LR 3e-4 cosine, <= 10
epochs), KL coefficient 0.01..10: forgetting 0.264 / 0.045 / 0.018 / 0.007 / 0.006; the smallest
model cannot reach the target with strong KL.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from . import analysis, capacity

AXIS = "D"  # the pretraining stage's grid axis (model.D)
PAPER = {
    "params": [6e6, 12e6, 21e6, 32e6, 46e6],
    "forgetting": [0.264, 0.045, 0.018, 0.007, 0.006],
}


def table(finetune: pd.DataFrame, pretrain: pd.DataFrame, target: float, floor: float) -> pd.DataFrame:
    """Per width: the capacity slices (`capacity.parent_table`) and, beside our i-th smallest
    width, the paper's i-th smallest."""
    t = capacity.parent_table(finetune, pretrain, target, AXIS, floor)
    t["paper_params"] = (PAPER["params"] + [float("nan")] * len(t))[: len(t)]
    t["paper_forgetting"] = (PAPER["forgetting"] + [float("nan")] * len(t))[: len(t)]
    return t


def claims(table: pd.DataFrame, finetune: pd.DataFrame, target: float) -> dict[str, tuple[bool, str]]:
    """Forgetting falls with size (Spearman rho <= -0.8 over >= 4 widths, every width at the
    target); the smallest width misses the target at the strongest coefficient."""
    reached = table[table["reached_target"]]
    rho = analysis.spearman(reached["params"], reached["forgetting"])
    numbers = ", ".join(f"D={int(d)}: {f:.3f}" for d, f in zip(table.index, table["forgetting"]))
    missed = ", ".join(str(int(d)) for d in table.index[~table["reached_target"]])
    return {
        "forgetting falls with size (Spearman rho <= -0.8, >= 4 widths at the target)": (
            len(reached) >= 4 and len(reached) == len(table) and rho <= -0.8,
            f"rho {rho:.2f} over {len(reached)} widths ({numbers})"
            + (f"; no run at the target: D={missed}" if missed else ""),
        ),
        "the smallest width misses the target at the strongest coefficient": capacity.strongest_misses(
            finetune, target, AXIS, int(table.index.min())
        ),
    }


def plot(table: pd.DataFrame) -> go.Figure:
    return capacity.band_plot(
        table,
        "params",
        "parameters N = 12 L D^2 + D V",
        "model_size: larger models forget less at the same new-task loss",
        {"x": PAPER["params"], "forgetting": PAPER["forgetting"]},
    )
