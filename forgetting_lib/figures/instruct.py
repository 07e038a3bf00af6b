"""instruct: does it hold for a pretrained Hugging Face model? (the paper's last experiment).

Paper: Llama-3.2-1B-Instruct finetuned on Verilog (PyraNet) at LR 1e-5 with 512-token rows; replay
coefficient 1 from OLMo pretraining data (real) or from rows the frozen model samples prompted by
BOS alone (self-generated, no chat template). At the start: Verilog token accuracy 72.1%, mean of
MMLU, ARC-Challenge and CommonsenseQA 53.7%; at ~87% Verilog accuracy the benchmark mean is
standard 49.1%, NTP real 46.0%, NTP self 51.6%, KL real 52.7%, KL self 52.7%.

The same engine runs it: the parent is `model.load_path=hf:<folder>` (engine/hf.py). At the quick
scale the parent is the figure parent (the tutorial model pretrained on the English sample)
exported to a Hugging Face folder and imported back through that path (`prepare`), finetuned on
Python source code, with English token accuracy (`prev_acc`) as the old-domain metric; at the
paper scale the old-domain metric is the benchmark mean (`mc_mean`, `log.mc_evals`).

Runs are compared at equal new-task performance: where the new-domain token accuracy
(`valid_acc`) first reaches `target_acc`, interpolated between evaluations (as error 1 - acc
falling through 1 - target), or at their best accuracy if they never get there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..engine.finetune import export_run
from ..engine.hf import PREFIX, provenance
from ..methods import METHODS
from ..prep.binarize import binarize_or_reuse
from ..runs import read_summary
from . import analysis
from .common import COLOURS

PAPER = {
    "start": {"new_acc": 0.721, "old_metric": 0.537},
    "new_acc": 0.87,
    "old_metric": {
        "standard": 0.491,
        "ntp_real": 0.460,
        "ntp_self": 0.516,
        "kl_real": 0.527,
        "kl_self": 0.527,
    },
}
OLD_COLUMNS = ("prev_acc", "prev_ntp", "mc_mean")  # what is read at the target where a run has it


def run_sweep(
    spec: Any, *, code_corpus: str | None, code_tokens: int | None, workers: int = 1, notebook: bool = True
) -> pd.DataFrame:
    """The figure's runs: the pretrain stage (quick scale), `prepare`, then the finetune stage
    (finished points skipped, as `experiments.sweep.run_sweep`). The paper scale has no pretrain
    stage: its parent is a hub model and its token files are made beforehand."""
    from ..experiments.sweep import run_sweep as run
    from ..experiments.sweep_spec import load_spec

    spec = load_spec(spec)
    stages = [s.name for s in spec.stages]
    done = []
    if "pretrain" in stages:
        done.append(run(spec, workers=workers, notebook=notebook, stages=["pretrain"]))
        if code_corpus is None:
            raise ValueError("instruct: a sweep with a pretrain stage needs code_corpus (the new domain)")
        prepare(spec, code_corpus=code_corpus, max_tokens=code_tokens)
    done.append(run(spec, workers=workers, notebook=notebook, stages=["finetune"]))
    return pd.concat(done)


def prepare(spec: Any, *, code_corpus: str, max_tokens: int | None, dataset_id: int = 2) -> dict[str, Path]:
    """What the finetune stage reads, made from the finished pretrain stage: its (one) run
    exported as a Hugging Face folder at the finetune stage's `model.load_path`, and the code
    corpus binarized to the finetune stage's `data.path` with that folder's tokenizer. Both are
    reused when already made from the same run and corpus."""
    from ..experiments.sweep_spec import load_spec, plan

    spec = load_spec(spec)
    points = plan(spec)
    parents = [p for p in points if p.stage == "pretrain"]
    finetune = next(p for p in points if p.stage == "finetune").config()
    if len(parents) != 1 or not finetune.model.load_path.startswith(PREFIX):
        raise ValueError(
            "instruct.prepare needs one pretrain point and a finetune stage whose model.load_path is "
            "hf:<folder> (see params/quick/instruct.yaml)"
        )
    run_dir, folder = parents[0].out_dir, Path(finetune.model.load_path.removeprefix(PREFIX))
    made = provenance(folder) if folder.is_dir() else None
    final = (read_summary(run_dir) or {}).get("final", {}).get("valid_ntp")
    if made is None or made["run"] != os.path.abspath(run_dir) or made["parent"]["final_valid_ntp"] != final:
        export_run(run_dir, folder)  # a new export when the parent run is another or was redone
    binarize_or_reuse(code_corpus, folder, finetune.data.path, dataset_id=dataset_id, max_tokens=max_tokens)
    return {"model": folder, "data": Path(finetune.data.path)}


def _start(df: pd.DataFrame, column: str) -> float:
    """The parent's value of `column`: the mean over runs of their first evaluation (step 0)."""
    first = df.sort_values("step", kind="stable").groupby("run", sort=False).head(1)
    return float(first[column].mean()) if column in first else np.nan


def table(df: pd.DataFrame, target_acc: float | None, old_metric: str = "prev_acc") -> pd.DataFrame:
    """Per method: new-domain accuracy and the old-domain metrics at `target_acc` (or at the best
    new-domain accuracy where a run never reaches it, and for every run when None), the old
    metric's drop from the start, and the paper's numbers."""
    df = df.assign(valid_err=1.0 - df["valid_acc"])
    columns = ["valid_acc", *[c for c in OLD_COLUMNS if c in df and df[c].notna().any()], "tokens", "step"]
    if old_metric not in columns:
        raise ValueError(f"instruct.table: the runs have no {old_metric!r} metric (columns: {columns})")
    best = analysis.at_best(df, new="valid_err", columns=columns)
    if target_acc is not None:
        hit = analysis.at_target(df, 1.0 - target_acc, new="valid_err", columns=columns)
        t = hit.where(hit["reached"].astype(bool), best).assign(reached=hit["reached"].astype(bool))
    else:
        t = best.assign(reached=False)
    t = t.set_index("axis.method")
    t = t.loc[[m for m in METHODS if m in t.index] + [m for m in t.index if m not in METHODS]]
    start = _start(df, old_metric)
    paper = pd.Series([PAPER["old_metric"].get(m, np.nan) for m in t.index], index=t.index)
    out = pd.DataFrame(
        {
            "new_acc": t["valid_acc"],
            "old_metric": t[old_metric],
            "old_drop": start - t[old_metric],
            **{c: t[c] for c in OLD_COLUMNS if c in t and c != old_metric},
            "reached_target": t["reached"],
            "tokens": t["tokens"],
            "paper_old_metric": paper,
            "paper_old_drop": PAPER["start"]["old_metric"] - paper,
        }
    )
    out.attrs.update(old_metric=old_metric, start_old=start, start_new=_start(df, "valid_acc"))
    return out.rename_axis("method")


def claims(table: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """Self-generated replay keeps the old-domain metric about as well as real replay, and far
    better than standard finetuning (drops measured from the parent's value)."""
    drop, reached = table["old_drop"], table["reached_target"]
    out = {}

    def void(*methods: str) -> str:
        off = [m for m in methods if not reached[m]]
        return f"not at the target: {', '.join(off)}; " if off else ""

    if {"standard", "kl_self"} <= set(drop.index):
        why = void("standard", "kl_self")
        out["KL self loses <= 1/2 of standard's drop in the old metric"] = (
            not why and bool(drop["kl_self"] <= 0.5 * drop["standard"]),
            f"{why}{drop['kl_self']:.4f} vs {drop['standard']:.4f}",
        )
    for kind in ("kl", "ntp"):
        self_, real = f"{kind}_self", f"{kind}_real"
        if {"standard", self_, real} <= set(drop.index):
            gap, why = abs(drop[self_] - drop[real]), void("standard", self_, real)
            out[f"|{kind.upper()} self - {kind.upper()} real| <= 1/4 of standard's drop"] = (
                not why and bool(gap <= 0.25 * drop["standard"]),
                f"{why}{gap:.4f} vs {0.25 * drop['standard']:.4f}",
            )
    return out


def plot(df: pd.DataFrame, table: pd.DataFrame, target_acc: float | None) -> go.Figure:
    """Left: the old-domain metric against new-domain token accuracy along every run (a run moves
    left to right as it learns; higher = less forgetting), as the paper's figure. Right: the share
    of the parent's old-domain metric kept at the target, ours beside the paper's."""
    metric = table.attrs["old_metric"]
    fig = make_subplots(
        1,
        2,
        column_widths=[0.6, 0.4],
        subplot_titles=("Old-domain metric vs new-domain accuracy", "Old-domain metric kept at the target"),
    )
    for i, method in enumerate(table.index):
        run = df[df["axis.method"] == method].sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=run["valid_acc"],
                y=run[metric],
                mode="lines+markers",
                name=method,
                legendgroup=method,
                line=dict(color=COLOURS[i % len(COLOURS)]),
            ),
            1,
            1,
        )
    if target_acc is not None:
        fig.add_vline(
            x=target_acc, line_dash="dot", line_color="grey", annotation_text="target", row=1, col=1
        )
    kept = table["old_metric"] / table.attrs["start_old"]
    paper_kept = table["paper_old_metric"] / PAPER["start"]["old_metric"]
    fig.add_trace(go.Bar(x=list(table.index), y=kept, name="ours", marker_color="#1f77b4"), 1, 2)
    fig.add_trace(go.Bar(x=list(table.index), y=paper_kept, name="paper", marker_color="#bbbbbb"), 1, 2)
    fig.update_xaxes(title_text="new-domain token accuracy", row=1, col=1)
    fig.update_yaxes(title_text=f"old-domain metric ({metric})", row=1, col=1)
    fig.update_yaxes(title_text="metric at target / parent's", row=1, col=2)
    fig.update_layout(
        template="plotly_white",
        barmode="group",
        width=1200,
        height=500,
        title="instruct: self-generated replay keeps a pretrained model's old abilities as real data does",
    )
    return fig
