"""Forgetting, compute multiplier and frontiers: pure functions over `runs.load_runs` DataFrames.

Runs are compared at equal new-task performance (PAPER.md "Definitions"): either where the
new-task validation loss first crosses a target, linearly interpolated between the two
evaluations around the crossing, or at each run's best new-task loss (early stopping).

Per-run tables are indexed by `run` and carry the run's config (every dotted column, e.g.
`opt.lr`, `reg.coeff`) plus `experiment`, `status` and `stop_reason`, so callers can group and
filter by any config value. Rows of one run are always taken in `step` order.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

COLUMNS = ("prev_ntp", "forgetting", "tokens", "step", "train_time_s")
_META = ("experiment", "status", "stop_reason")


def _require(df: pd.DataFrame, columns: Iterable[str], fn: str) -> None:
    """Raise a ValueError naming `fn` if `df` is empty or lacks any of `columns`."""
    if len(df) == 0:
        raise ValueError(f"{fn}: the DataFrame is empty (no evaluations; did load_runs find any run?)")
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        raise ValueError(
            f"{fn} needs column(s) {', '.join(map(repr, missing))}, which the DataFrame "
            f"lacks (it has: {', '.join(map(str, df.columns))})"
        )


def _runs(df: pd.DataFrame, fn: str) -> Iterator[tuple[Any, pd.DataFrame]]:
    """(run, its rows sorted by step) for every run, in order of first appearance."""
    if "path" in df.columns:
        paths = df.groupby("run", sort=False)["path"].nunique()
        if (paths > 1).any():
            raise ValueError(
                f"{fn}: run name(s) {list(paths.index[paths > 1])} belong to several run "
                f"folders; select one experiment first (e.g. df[df.experiment == ...])"
            )
    for run, frame in df.groupby("run", sort=False):
        yield run, frame.sort_values("step", kind="stable")


def _config(frame: pd.DataFrame) -> dict[str, Any]:
    """The run's config (every dotted column) and metadata, from its first row."""
    first = frame.iloc[0]
    return {c: first[c] for c in frame.columns if "." in str(c) or c in _META}


def _per_run(df: pd.DataFrame, fn: str, row: Callable[[pd.DataFrame], dict[str, Any] | None]) -> pd.DataFrame:
    """One row per run: `row(frame)` (skipped when None) followed by the run's config."""
    records = {}
    for run, frame in _runs(df, fn):
        values = row(frame)
        if values is not None:
            records[run] = {**values, **_config(frame)}
    return pd.DataFrame.from_dict(records, orient="index").rename_axis("run")


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's last evaluation (its highest step), runs in order of first appearance."""
    _require(df, ["run", "step"], "final_rows")
    return df.sort_values("step", kind="stable").groupby("run", sort=False).tail(1)


def _crossing(frame: pd.DataFrame, metric: str, level: float) -> tuple[int, float] | None:
    """Where `metric` first gets <= `level` among the rows where it is defined.

    Returns (i, f): row i is the first at or below `level` and the crossing lies the fraction f
    in (0, 1] of the way from row i-1 to row i (f = 1 when i = 0: the first row is taken as is);
    None if `metric` never gets there.
    """
    values = frame[metric].to_numpy(dtype=float)
    below = np.flatnonzero(values <= level)  # NaN compares False
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return 0, 1.0
    before, after = values[i - 1], values[i]  # before > level >= after: the denominator is > 0
    return i, float((before - level) / (before - after))


def _interpolate(frame: pd.DataFrame, i: int, f: float, columns: Sequence[str]) -> dict[str, float]:
    """Each of `columns` a fraction f of the way from row i-1 to row i (row i itself when f = 1)."""
    after = {c: float(frame[c].to_numpy(dtype=float)[i]) for c in columns}
    if f == 1.0:
        return after
    before = {c: float(frame[c].to_numpy(dtype=float)[i - 1]) for c in columns}
    return {c: before[c] + f * (after[c] - before[c]) for c in columns}


def _at_crossing(frame: pd.DataFrame, metric: str, level: float, columns: Sequence[str]) -> dict | None:
    """`columns` interpolated where `metric` first crosses `level` (None if it never does)."""
    frame = frame[frame[metric].notna()]
    hit = _crossing(frame, metric, level)
    return None if hit is None else _interpolate(frame, *hit, columns)


def _at_best(frame: pd.DataFrame, metric: str, columns: Sequence[str]) -> dict[str, float]:
    """`metric` and `columns` at the row with the lowest `metric` (the earliest of ties)."""
    frame = frame[frame[metric].notna()]
    if len(frame) == 0:
        return {c: np.nan for c in (metric, *columns)}
    i = int(np.argmin(frame[metric].to_numpy(dtype=float)))  # argmin: the first of equal minima
    return {c: float(frame[c].to_numpy(dtype=float)[i]) for c in (metric, *columns)}


def at_target(
    df: pd.DataFrame, target: float, *, new: str = "valid_ntp", columns: Sequence[str] = COLUMNS
) -> pd.DataFrame:
    """Per run, `columns` at the first point where the `new` loss reaches `target`.

    The crossing is interpolated linearly between the last evaluation above `target` and the
    first at or below it (a run whose first evaluation is already at or below `target` is taken
    there as is). Column `reached` says whether the run got there; runs that never did get NaN in
    `columns` and in the `new` column, which otherwise equals `target`.
    """
    columns = list(columns)
    _require(df, ["run", "step", new, *columns], "at_target")

    def row(frame: pd.DataFrame) -> dict[str, Any]:
        hit = _at_crossing(frame, new, target, columns)
        if hit is None:
            return {new: np.nan, **{c: np.nan for c in columns}, "reached": False}
        return {**hit, new: float(target), "reached": True}

    return _per_run(df, "at_target", row)


def at_best(df: pd.DataFrame, *, new: str = "valid_ntp", columns: Sequence[str] = COLUMNS) -> pd.DataFrame:
    """Per run, the evaluation with the lowest `new` loss (early stopping at the best new-task
    loss; of equal losses the earliest): the `new` loss and `columns` there."""
    columns = list(columns)
    _require(df, ["run", "step", new, *columns], "at_best")
    return _per_run(df, "at_best", lambda frame: _at_best(frame, new, columns))


def forgetting_table(
    df: pd.DataFrame,
    target: float | None = None,
    *,
    new: str = "valid_ntp",
    old: str = "prev_ntp",
    baseline: str = "parent.final_valid_ntp",
) -> pd.DataFrame:
    """Per finetuning run (one with any `old` loss): how much it forgot at equal new-task loss.

    With a `target`, runs that reach it are read at the interpolated crossing (`at` = "target",
    `reached` = True) and the others at their best new loss (`at` = "best", `reached` = False);
    without one, every run is read at its best new loss (`reached` = False). Columns: `new_loss`,
    `old_loss`, `baseline` (the old loss at the end of pretraining: the `baseline` config column,
    or where that is missing or NaN the run's first evaluated `old` loss), `forgetting` =
    old_loss - baseline (nats/token), `tokens`, `steps`, `train_time_s`, `reached`, `at`.
    """
    _require(df, ["run", "step", "tokens", "train_time_s", new, old], "forgetting_table")
    columns = [new, old, "tokens", "step", "train_time_s"]
    if not df[old].notna().any():
        raise ValueError(
            f"forgetting_table: no finetuning run in the DataFrame (column {old!r} is "
            f"NaN everywhere; pretraining runs have no old-data loss)"
        )

    def row(frame: pd.DataFrame) -> dict[str, Any] | None:
        olds = frame[old].dropna()
        if olds.empty:
            return None  # a pretraining run
        hit = _at_crossing(frame, new, target, columns) if target is not None else None
        point = {**hit, new: float(target)} if hit is not None else _at_best(frame, new, columns)
        base = frame[baseline].iloc[0] if baseline in frame.columns else np.nan
        base = float(olds.iloc[0]) if pd.isna(base) else float(base)
        return {
            "new_loss": point[new],
            "old_loss": point[old],
            "baseline": base,
            "forgetting": point[old] - base,
            "tokens": point["tokens"],
            "steps": point["step"],
            "train_time_s": point["train_time_s"],
            "reached": hit is not None,
            "at": "target" if hit is not None else "best",
        }

    return _per_run(df, "forgetting_table", row)


def compute_multiplier(
    pretrain_df: pd.DataFrame, old_loss: float, *, metric: str = "valid_ntp", x: str = "tokens"
) -> float:
    """The fraction of pretraining that forgetting undid (PAPER.md): where the pretraining run's
    `metric` first reached `old_loss` (interpolated in `x`), divided by the run's final `x`.

    1.0 if the curve never gets down to `old_loss` (below the final pretraining loss: nothing was
    forgotten); 0.0 if `old_loss` is at or above the first evaluation's loss (all of it was).
    `pretrain_df` must hold exactly one run.
    """
    _require(pretrain_df, ["run", "step", metric, x], "compute_multiplier")
    runs = list(pretrain_df["run"].unique())
    if len(runs) != 1:
        raise ValueError(
            f"compute_multiplier needs exactly one pretraining run; got {len(runs)}: "
            f"{', '.join(map(str, runs))}"
        )
    curve = pretrain_df.sort_values("step", kind="stable").dropna(subset=[metric, x])
    if curve.empty:
        raise ValueError(
            f"compute_multiplier: run {runs[0]!r} has no evaluation with both {metric!r} and {x!r}"
        )
    if old_loss >= curve[metric].iloc[0]:
        return 0.0
    final = float(curve[x].iloc[-1])
    hit = _at_crossing(curve, metric, old_loss, [x])
    return 1.0 if hit is None else hit[x] / final


def lr_times_steps(table: pd.DataFrame, *, lr: str = "opt.lr", steps: str = "steps") -> pd.Series:
    """Learning rate x steps (to the target) per run: about constant when steps grow as 1/LR."""
    _require(table, [lr, steps], "lr_times_steps")
    return (table[lr].astype(float) * table[steps].astype(float)).rename("lr_x_steps")


def _time_at(df: pd.DataFrame, level: float, metric: str, time: str, fn: str) -> pd.Series:
    """Per run, `time` interpolated where `metric` first gets <= `level` (NaN if it never does)."""
    _require(df, ["run", "step", metric, time], fn)
    values = {
        run: (_at_crossing(frame, metric, level, [time]) or {time: np.nan})[time]
        for run, frame in _runs(df, fn)
    }
    return pd.Series(values, name=time, dtype=float).rename_axis("run")


def time_to_target(
    df: pd.DataFrame, target: float, *, metric: str = "valid_ntp", time: str = "train_time_s"
) -> pd.Series:
    """Per run, the (interpolated) `time` at which `metric` first reaches `target`; NaN if never."""
    return _time_at(df, target, metric, time, "time_to_target")


def first_below(
    df: pd.DataFrame, threshold: float, *, metric: str = "prev_ntp", time: str = "train_time_s"
) -> pd.Series:
    """Per run, the (interpolated) `time` at which `metric` first gets <= `threshold`, NaN if
    never: e.g. how long until the old-data loss is back down to a level."""
    return _time_at(df, threshold, metric, time, "first_below")


def pareto_frontier(table: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows no other row dominates in (lower `x`, lower `y`), sorted by `x`.

    A row is dominated when another is at least as low in both and lower in one; equal rows do
    not dominate each other. Rows with NaN in `x` or `y` are left out.
    """
    _require(table, [x, y], "pareto_frontier")
    rows = table[table[x].notna() & table[y].notna()]
    xs, ys = rows[x].to_numpy(dtype=float), rows[y].to_numpy(dtype=float)
    no_worse = (xs[None, :] <= xs[:, None]) & (ys[None, :] <= ys[:, None])  # [i, j]: j vs row i
    better = (xs[None, :] < xs[:, None]) | (ys[None, :] < ys[:, None])
    dominated = (no_worse & better).any(axis=1)
    return rows[~dominated].sort_values([x, y], kind="stable")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (ties share their mean rank); NaN with < 3 points or a constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
