"""What the capacity figures share (model_size, pretrain_length, model_capacity, 2d_grid): their
synthetic data, the loss floor it gives every plot, and "the best run at the target" per
pretrained model.

The quick scale trains on the `synthetic:` language pair (`prep/synthetic.py`): unlimited fresh
tokens, so a long pretraining means more *new* text, never more epochs of the same text (the
English sample has 1.15M tokens: 1000 tokens per parameter of even a 12K-parameter model would
be 11 epochs of it), and an exact entropy rate, the floor no model can go below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..config import ModelConfig
from ..engine.model import paper_param_count
from . import analysis
from .common import figure_params


def prepare_data(
    out: str | Path,
    *,
    old: str,
    new: str,
    vocab_size: int,
    old_tokens: int,
    new_tokens: int,
    byte_fallback: bool = True,
) -> dict[str, Any]:
    """The tokenizer of the pair `old`/`new` (corpus specs) and their token files `old.bin`
    (dataset id 0) and `new.bin` (id 1) in `out`, each made once and reused after. Returns their
    paths and, for a synthetic pair, each language's loss floor inputs: entropy rate, marginal
    entropy and tokens per word (1 when the tokenizer learnt every word as one piece).
    `byte_fallback=False` suits a synthetic pair (its tokenizer needs no byte pieces)."""
    from ..prep import binarize as binarize_lib, synthetic, tokenizer as tokenizer_lib

    out = Path(out)
    tok = tokenizer_lib.train_or_load(
        [old, new], out / "tokenizer", vocab_size=vocab_size, byte_fallback=byte_fallback
    )
    info: dict[str, Any] = {"tokenizer": str(out / "tokenizer")}
    for name, spec, dataset_id, tokens in (("old", old, 0, old_tokens), ("new", new, 1, new_tokens)):
        path = out / f"{name}.bin"
        meta = binarize_lib.binarize_or_reuse(spec, tok, path, dataset_id=dataset_id, max_tokens=tokens)
        info[name] = {"path": str(path), "corpus": spec, "tokens": meta["num_tokens"]}
        if spec.startswith("synthetic:"):
            h = synthetic.entropy(spec)
            (stats,) = tokenizer_lib.compression_stats(tok, {name: spec})
            info[name] |= {
                "entropy_rate": h.rate,
                "marginal_entropy": h.marginal,
                "tokens_per_word": stats["tokens_per_word"],
            }
    return info


def loss_floor(info: Mapping[str, Any], T: int) -> float:
    """The lowest mean next-token loss any model reaches on rows of T tokens of one language of
    `prepare_data`'s result (`info["old"]` or `info["new"]`); NaN for a natural corpus."""
    from ..prep import synthetic

    if "entropy_rate" not in info:
        return float("nan")
    return synthetic.loss_floor(info["corpus"], T, info["tokens_per_word"])


def best_at_target(df: pd.DataFrame, target: float, by: str) -> pd.DataFrame:
    """Per value of the column `by` (the parent: a size, a TPP), the finetuning run with the lowest
    old-data loss among those that reached the new-task `target`; the paper's model_size and
    pretrain_length plot exactly this over a swept replay coefficient. Columns: forgetting_table's,
    plus `runs` (finetunes of that parent) and `reached_runs`; a parent none of whose runs reached
    the target keeps its closest run (the lowest new loss), with `reached` False."""
    t = analysis.forgetting_table(df, target)
    rows = {}
    for value, group in t.groupby(by, sort=True):
        hit = group[group["reached"]]
        best = hit.loc[hit["old_loss"].idxmin()] if len(hit) else group.loc[group["new_loss"].idxmin()]
        rows[value] = {**best.to_dict(), "run": best.name, "runs": len(group), "reached_runs": len(hit)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(by)


def final_losses(pretrain: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per value of `by`, the last evaluation of each pretraining run: tokens, old loss
    (`valid_ntp`), new loss where the run mixed it in (`mix_ntp`), and the parent parameters."""
    last = analysis.final_rows(pretrain)
    wanted = ("tokens", "valid_ntp", "mix_ntp", "model.D", "model.L", "model.H", "model.V")
    cols = [c for c in wanted if c in last]
    return last.set_index(by)[cols].sort_index()


def parent_table(
    finetune: pd.DataFrame, pretrain: pd.DataFrame, target: float, axis: str, floor: float = float("nan")
) -> pd.DataFrame:
    """The capacity slices per pretrained model (one row per value of the pretraining stage's
    grid `axis`, sorted by it): its parameters N and tokens per parameter, the old-data loss
    after pretraining, the best old-data loss after finetuning to the new-task `target` (over the
    finetunes of that parent: `best_at_target`), forgetting (their difference), the coefficient
    that gave it, and the loss floor. Both stages come from `load_stage`."""
    key = f"axis.pretrain.{axis}"
    best = best_at_target(finetune, target, key)
    pre = final_losses(pretrain, f"axis.{axis}")
    rows = []
    for label in sorted(best.index, key=float):
        b, p = best.loc[label], pre.loc[label]
        n = paper_param_count(ModelConfig(**{k: int(p[f"model.{k}"]) for k in ("D", "L", "H", "V")}))
        rows.append(
            {
                axis: float(label),
                "params": n,
                "trained_tpp": float(p["tokens"]) / n,
                "old_pretrained": float(p["valid_ntp"]),
                "old_finetuned": float(b["old_loss"]),
                "forgetting": float(b["forgetting"]),
                "new_loss": float(b["new_loss"]),
                "reached_target": bool(b["reached"]),
                "coeff": float(b["reg.coeff"]),
                "runs_at_target": f"{int(b['reached_runs'])}/{int(b['runs'])}",
                "floor": floor,
            }
        )
    return pd.DataFrame(rows).set_index(axis)


def strongest_misses(finetune: pd.DataFrame, target: float, axis: str, label: Any) -> tuple[bool, str]:
    """Whether the finetune of parent `label` (of the pretraining `axis`) with the largest
    coefficient never reached `target`, and its numbers."""
    t = analysis.forgetting_table(finetune, target)
    mine = t[t[f"axis.pretrain.{axis}"].astype(str) == str(label)]
    if mine.empty:
        return False, f"no finetune of {axis}={label}"
    run = mine.loc[mine["reg.coeff"].astype(float).idxmax()]
    return (
        not bool(run["reached"]),
        f"coefficient {float(run['reg.coeff']):g}: best new loss {run['new_loss']:.3f} vs target {target}",
    )


def band_plot(
    table: pd.DataFrame, x: str, x_title: str, title: str, paper: Mapping[str, Sequence[float]]
) -> Any:
    """Left: old-data loss per pretrained model after pretraining and after finetuning to the
    target (the band between them is forgetting) above the loss floor. Right: forgetting, ours
    and the paper's (`paper`: {"x": ..., "forgetting": ...}) on one log axis."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        1,
        2,
        column_widths=[0.6, 0.4],
        subplot_titles=("Old-data loss: after pretraining, after finetuning, floor", "Forgetting"),
    )
    xs = table[x] if x in table.columns else table.index
    fig.add_trace(
        go.Scatter(x=xs, y=table["old_pretrained"], name="after pretraining", mode="lines+markers"), 1, 1
    )
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=table["old_finetuned"],
            name="after finetuning (best at the target)",
            mode="lines+markers",
            fill="tonexty",
            text=["" if r else "target missed" for r in table["reached_target"]],
        ),
        1,
        1,
    )
    if table["floor"].notna().any():
        fig.add_trace(
            go.Scatter(x=xs, y=table["floor"], name="entropy floor", line=dict(dash="dot", color="grey")),
            1,
            1,
        )
    fig.add_trace(go.Scatter(x=xs, y=table["forgetting"], name="ours", mode="lines+markers"), 1, 2)
    fig.add_trace(
        go.Scatter(x=list(paper["x"]), y=list(paper["forgetting"]), name="paper", mode="lines+markers"), 1, 2
    )
    fig.update_xaxes(title_text=x_title, type="log")
    fig.update_yaxes(title_text="old-data loss, nats/token", row=1, col=1)
    fig.update_yaxes(title_text="forgetting, nats/token", row=1, col=2)
    fig.update_layout(template="plotly_white", width=1200, height=500, title=title)
    return fig


def figure_data(data: Mapping[str, Any] | None, name: str, scale: str = "quick") -> dict[str, Any]:
    """A capacity figure notebook's data: `data` (prepare_data's keyword arguments), or when None
    the `data:` of `params/<scale>/<name>.yaml`; prepared (made once, reused) and returned."""
    if data is None:
        from ..fileio import read_yaml

        data = read_yaml(figure_params(name, scale))["data"]
    return prepare_data(**data)


def floors(info: Mapping[str, Any], spec: Any) -> dict[str, float]:
    """The old and new languages' loss floors at the row length of the sweep's runs."""
    from ..experiments.sweep_spec import plan

    T = plan(spec)[0].config().data.T
    return {"old": loss_floor(info["old"], T), "new": loss_floor(info["new"], T)}
