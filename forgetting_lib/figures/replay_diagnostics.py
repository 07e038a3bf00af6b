"""replay_diagnostics: what makes self-generated replay work. Sampling choices ablated one at a
time, each point finetuned to the same new-task loss; forgetting beside the diagnostics of the
rows it replayed (engine/diagnostics.py); which diagnostic predicts forgetting.

Not a figure of the paper: its self-generated setting is one point here (`self`: temperature 1,
full softmax, each row used once, a quarter of the batch). The paper reports for that setting
forgetting +0.006 (NTP, self-generated) vs +0.005 (NTP, real) vs +0.113 (standard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import config as config_lib, runs
from ..engine import data as data_lib, diagnostics
from ..prep.tokenizer import Tokenizer
from . import analysis
from .common import COLOURS

PAPER = {"forgetting": {"standard": 0.113, "real": 0.005, "self": 0.006}}

AXIS = "axis.replay"  # the sweep axis whose labels name the points
SETTINGS = {  # config columns shown beside each point: what was sampled and how it was replayed
    "reg.synth": "self_generated",
    "reg.temperature": "temperature",
    "reg.top_p": "top_p",
    "reg.reuse": "reuse",
    "reg.replay_batch_size": "replay_rows",
}
# diagnostic -> what it says; a larger value means further from real rows for all but
# id_old_fraction and distinct_2 (an id classifier share of old, n-gram variety)
DIAGNOSTICS = {
    "parent_loss_gap": "parent's loss on replay rows minus on real rows (nats/token)",
    "unigram_js": "unigram Jensen-Shannon divergence to real rows (bits)",
    "bigram_js": "bigram Jensen-Shannon divergence to real rows (bits)",
    "distinct_2": "distinct bigrams / bigrams",
    "duplicate_rows": "fraction of replayed rows equal to an earlier one",
    "eos_rate": "EOS tokens per token",
    "id_old_fraction": "fraction a bigram-model classifier assigns to the old corpus",
}


def diagnostics_frame(df: pd.DataFrame) -> pd.DataFrame:
    """engine.diagnostics.run_diagnostics of every run in `df` that stored replay rows, each on
    the first n of them for the smallest n among those runs (count-based statistics depend on
    n), indexed by its AXIS label."""
    paths = {label: Path(frame["path"].iloc[0]) for label, frame in df.groupby(AXIS, sort=False)}
    kept = {label: runs.read_replay_rows(path) for label, path in paths.items()}
    kept = {label: rows for label, rows in kept.items() if rows is not None}
    common = min((len(rows) for rows in kept.values()), default=0)  # every point at one row count
    references: dict = {}  # one per parent and new dataset
    records = {label: diagnostics.run_diagnostics(paths[label], references, common) for label in kept}
    return pd.DataFrame.from_dict(records, orient="index").rename_axis("point")


def table(df: pd.DataFrame, target: float | None, diag: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per point (AXIS label): its sampling settings, new/old loss and forgetting at the new-task
    `target` (or at its best new loss when it never gets there), forgetting relative to standard
    finetuning, self-generated rows sampled, and the diagnostics of its replay rows (`diag`,
    default `diagnostics_frame(df)`)."""
    t = analysis.forgetting_table(df, target).set_index(AXIS)
    sampled = df.groupby(AXIS)["path"].first().map(_sampled_rows)
    out = pd.DataFrame({name: t[key] for key, name in SETTINGS.items() if key in t.columns})
    out["self_generated"] = out["self_generated"].astype(bool) & (t["reg.method"] != "none")
    out["new_loss"], out["forgetting"], out["reached_target"] = t["new_loss"], t["forgetting"], t["reached"]
    if "standard" in t.index:
        out["vs_standard"] = t["forgetting"] / t.loc["standard", "forgetting"]
    out["sampled_rows"] = sampled.reindex(out.index)
    out["paper_forgetting"] = [PAPER["forgetting"].get(p, np.nan) for p in out.index]
    diag = diagnostics_frame(df) if diag is None else diag
    return out.join(diag).rename_axis("point")


def _sampled_rows(path: str) -> float:
    summary = runs.read_summary(path) or {}
    return float(summary.get("sampled_rows", np.nan))


def predictors(table: pd.DataFrame, points: list[str] | None = None) -> pd.DataFrame:
    """Spearman rank correlation of forgetting with each diagnostic over the self-generated
    points that reached the target (or `points`), strongest first: `rho` (signed), `abs_rho`,
    `points`."""
    if points is None:
        points = list(table.index[table["self_generated"] & table["reached_target"]])
    sub = table.loc[points]
    rows = {}
    for name in DIAGNOSTICS:
        if name not in sub.columns:
            continue
        pair = sub[[name, "forgetting"]].dropna()
        rho = analysis.spearman(pair[name].to_numpy(), pair["forgetting"].to_numpy())
        rows[name] = {"rho": rho, "abs_rho": abs(rho), "points": len(pair), "meaning": DIAGNOSTICS[name]}
    out = pd.DataFrame.from_dict(rows, orient="index").rename_axis("diagnostic")
    return out.sort_values("abs_rho", ascending=False, na_position="last")


def claims(table: pd.DataFrame) -> dict[str, tuple[bool, str]]:
    """Checks at the paper's setting (`self`): its samples are conditioned on the old id, it
    replays nearly as well as real rows, and the diagnostics separate it from worse settings."""
    out: dict[str, tuple[bool, str]] = {}
    if "self" not in table.index:
        return out
    s = table.loc["self"]
    if "id_old_fraction" in table.columns:
        out["temperature-1 samples are classified as the old corpus (>= 90%, classifier >= 90% accurate)"] = (
            bool(s["id_old_fraction"] >= 0.9 and s["id_classifier_accuracy"] >= 0.9),
            f"{s['id_old_fraction']:.1%} (real rows: {s['id_old_fraction_real']:.1%}, "
            f"classifier accuracy {s['id_classifier_accuracy']:.1%})",
        )
    if {"standard", "real"} <= set(table.index):
        f, reached = table["forgetting"], table["reached_target"]
        off = [p for p in ("standard", "real", "self") if not reached[p]]
        why = f"not at the target: {', '.join(off)}; " if off else ""
        out["self-generated replay forgets <= 1/4 of standard"] = (
            not why and bool(f["self"] <= 0.25 * f["standard"]),
            f"{why}{f['self']:.3f} vs {f['standard']:.3f}",
        )
        gap = f["self"] - f["real"]
        out["self-generated within 0.1 x standard of real replay"] = (
            not why and bool(abs(gap) <= 0.1 * f["standard"]),
            f"{why}self {f['self']:.3f} - real {f['real']:.3f} = {gap:+.3f} vs {0.1 * f['standard']:.3f}",
        )
    return out


def conclusion(table: pd.DataFrame, ranked: pd.DataFrame) -> str:
    """A few plain sentences computed from the numbers: the paper's setting's diagnostics, how
    it compares with real replay, and which diagnostic tracks forgetting best."""
    lines = []
    if "self" in table.index:
        s = table.loc["self"]
        lines.append(
            f"At temperature 1 (the paper's setting) the parent's loss on its own samples is "
            f"{s['parent_loss']:.3f} nats/token vs {s['parent_loss_real']:.3f} on real old rows; "
            f"their unigram JS divergence to real rows is {s['unigram_js']:.3f} bits (two halves of "
            f"real rows: {s['unigram_js_floor']:.3f}), bigram {s['bigram_js']:.3f} "
            f"({s['bigram_js_floor']:.3f}); the id classifier assigns {s['id_old_fraction']:.0%} of "
            f"them to the old corpus."
        )
        if {"real", "standard"} <= set(table.index):
            f = table["forgetting"]
            lines.append(
                f"It forgets {f['self']:+.3f} nats at the target, real replay {f['real']:+.3f}, "
                f"standard finetuning {f['standard']:+.3f}."
            )
    usable = ranked.dropna(subset=["rho"])
    if not len(usable):
        lines.append(
            "Fewer than 3 self-generated points reached the target with distinct values, so no "
            "diagnostic's rank correlation with forgetting could be computed."
        )
    else:
        best = usable.iloc[0]
        direction = "more" if best["rho"] > 0 else "less"
        lines.append(
            f"Over {int(best['points'])} self-generated settings, {usable.index[0]} "
            f"({best['meaning']}) tracks forgetting best: Spearman rho = {best['rho']:+.2f} "
            f"(higher {usable.index[0]}, {direction} forgetting)"
            + (f"; next {usable.index[1]} ({usable.iloc[1]['rho']:+.2f})." if len(usable) > 1 else ".")
        )
    constant = [
        n
        for n in ranked.index
        if n in table.columns and ranked.loc[n, "points"] >= 3 and pd.isna(ranked.loc[n, "rho"])
    ]
    if constant:
        lines.append(f"{', '.join(constant)} took one value at every point, so it cannot rank them here.")
    return " ".join(lines)


def plot(table: pd.DataFrame, ranked: pd.DataFrame) -> go.Figure:
    """Forgetting against each diagnostic, one panel per diagnostic (strongest correlation
    first), every point labelled; real replay's rows as a grey cross (standard replays none)."""
    names = [n for n in ranked.index if n in table.columns]
    cols = min(len(names), 4) or 1
    rows = -(-len(names) // cols) or 1
    titles = [f"{n} (rho {ranked.loc[n, 'rho']:+.2f})" for n in names]
    fig = make_subplots(rows, cols, subplot_titles=titles, shared_yaxes=True)
    selfgen = table[table["self_generated"]]
    for i, name in enumerate(names):
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(
            go.Scatter(
                x=selfgen[name],
                y=selfgen["forgetting"],
                mode="markers+text",
                text=list(selfgen.index),
                textposition="top center",
                textfont=dict(size=9),
                marker=dict(
                    color=COLOURS[0],
                    size=9,
                    symbol=np.where(selfgen["reached_target"], "circle", "circle-open"),
                ),
                name="self-generated",
                legendgroup="self",
                showlegend=i == 0,
                hovertemplate="%{text}<br>" + name + " %{x:.4g}<br>forgetting %{y:.4f}<extra></extra>",
            ),
            r,
            c,
        )
        if "real" in table.index and pd.notna(table.loc["real"].get(name)):
            fig.add_trace(
                go.Scatter(
                    x=[table.loc["real", name]],
                    y=[table.loc["real", "forgetting"]],
                    mode="markers",
                    marker=dict(color="grey", size=11, symbol="x"),
                    name="real rows",
                    legendgroup="real",
                    showlegend=i == 0,
                ),
                r,
                c,
            )
        fig.update_xaxes(title_text=name, row=r, col=c)
    fig.update_yaxes(title_text="forgetting at the target (nats/token)", col=1)
    fig.update_layout(
        template="plotly_white",
        width=300 * cols + 100,
        height=320 * rows + 100,
        title="replay_diagnostics: forgetting against the diagnostics of the replayed rows",
    )
    return fig


def point_dir(df: pd.DataFrame, label: str) -> Path:
    """The run folder of the point labelled `label` (AXIS) in a `load_stage` frame."""
    paths = df.loc[df[AXIS] == label, "path"]
    if paths.empty:
        raise KeyError(f"no finished point {label!r} (points: {', '.join(map(str, df[AXIS].unique()))})")
    return Path(paths.iloc[0])


def examples(run_dir: str | Path, n: int = 3, chars: int = 300) -> pd.DataFrame:
    """The first `n` stored replay rows of a run beside `n` real rows of its parent's validation
    set: decoded (each cut to `chars` characters) when the token file names its tokenizer, else
    as token ids (files written without one, e.g. generated test data)."""
    cfg = config_lib.from_dict(runs.read_config(run_dir))
    p = cfg.parent
    old = data_lib.open_rows(
        p.data_path, T=p.T, valid_tokens=p.valid_tokens, split_seed=p.split_seed, vocab_size=cfg.model.V
    )
    replay = runs.read_replay_rows(run_dir)
    if replay is None:
        raise FileNotFoundError(f"{run_dir} holds no {runs.REPLAY_ROWS}: not a finetune with replay rows")
    rows = {"replayed": replay[:n, 1:], "real": old.rows(old.valid_rows[:n])[:, 1:]}
    if old.sidecar.get("tokenizer_dir"):
        decode = Tokenizer.load(_tokenizer_dir(old.sidecar, old.path)).decode_rows
    else:
        decode = lambda r: [" ".join(map(str, row)) for row in r]  # noqa: E731
    cut = lambda texts: [t[:chars] + ("..." if len(t) > chars else "") for t in texts]  # noqa: E731
    return pd.DataFrame({k: cut(decode(v)) for k, v in rows.items()})


def _tokenizer_dir(sidecar: dict[str, Any], path: Path) -> str:
    folder = sidecar["tokenizer_dir"]
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"{path}: its sidecar names tokenizer_dir={folder!r}, which does not exist here; "
            f"decoding needs that tokenizer (re-binarize, or restore the folder)"
        )
    return folder
