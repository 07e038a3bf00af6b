"""Run folders and the one reader of their results.

A run folder `outputs/<experiment>/<run>/` holds `config.yaml` (fully resolved), `metrics.jsonl`
(one JSON row per evaluation), `summary.json` (status, stop reason, final metrics) and
`checkpoint/`. `load_runs` turns any number of run folders into one tidy DataFrame; plots and
analysis read results only through it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from .fileio import atomic_write_json, atomic_write_text

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.yaml", "metrics.jsonl", "summary.json", "checkpoint"


class RunFolderError(ValueError):
    """A run folder is in a state that the requested action would damage; the message says why."""


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one evaluation row (flushed and fsynced: a killed run keeps every finished row)."""
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_metrics(run_dir: Path, max_step: int) -> None:
    """Keep only rows up to `max_step` (used when resuming from a checkpoint at that step)."""
    rows = [r for r in read_metrics(run_dir) if r["step"] <= max_step]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write_text(Path(run_dir) / METRICS, text)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise RunFolderError(f"{run_dir} is not a run folder (no {CONFIG})")
    return yaml.safe_load(path.read_text())


def is_finished(run_dir: str | Path) -> bool:
    summary = read_summary(run_dir)
    return summary is not None and summary.get("status") == "finished"


def find_runs(root: str | Path) -> list[Path]:
    """Every run folder (holding config.yaml) under `root`, or `root` itself, sorted."""
    root = Path(root)
    if (root / CONFIG).exists():
        return [root]
    return sorted(p.parent for p in root.rglob(CONFIG))


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def load_runs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per evaluation of every run found under `paths`.

    Columns: `run` (folder name), `experiment` (its parent's name), `path`, the metrics (`step`,
    `tokens`, `valid_ntp`, ...), `status` and `stop_reason` from the summary, and every config
    value as a dotted column (`opt.lr`, `model.D`, ...).
    """
    roots = [paths] if isinstance(paths, (str, Path)) else list(paths)
    frames = []
    for run_dir in (r for root in roots for r in find_runs(root)):
        rows = read_metrics(run_dir)
        if not rows:
            continue
        flat: dict[str, Any] = {}
        _flatten("", read_config(run_dir), flat)
        summary = read_summary(run_dir) or {}
        meta = {
            "run": run_dir.name,
            "experiment": run_dir.parent.name,
            "path": str(run_dir),
            "status": summary.get("status", "running"),
            "stop_reason": summary.get("stop_reason"),
        }
        frame = pd.DataFrame(rows)
        for key, value in {**meta, **flat}.items():
            frame[key] = [value] * len(frame)
        frames.append(frame)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def prepare_run_dir(
    config: dict[str, Any],
    out_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    defaults: dict[str, Any] | None = None,
) -> str:
    """Make `out_dir` ready for a run of `config`: "new", "resume" (an unfinished run to continue)
    or "finished" (resume=True on a finished run: nothing to do).

    A folder that already holds a run is never reused silently: without `resume` or `overwrite`
    it is an error, and resuming with a different config is an error that lists the differences.
    A key missing from the stored config (written before that key existed) counts as its value in
    `defaults`, so adding a config field does not orphan earlier runs.
    """
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    if not (out_dir / CONFIG).exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / CONFIG, yaml.safe_dump(config, sort_keys=False))
        return "new"
    if not resume:
        state = "a finished" if is_finished(out_dir) else "an unfinished"
        raise RunFolderError(
            f"{out_dir} already holds {state} run; pass resume=True (CLI --resume) "
            f"to continue it or overwrite=True (--overwrite) to start again"
        )
    new, old = {}, {}
    _flatten("", config, new)
    _flatten("", read_config(out_dir), old)
    if defaults is not None:
        flat_defaults: dict[str, Any] = {}
        _flatten("", defaults, flat_defaults)
        old = {**{k: v for k, v in flat_defaults.items() if k in new}, **old}
    differ = sorted(k for k in new.keys() | old.keys() if k != "log.progress" and new.get(k) != old.get(k))
    if differ:
        raise RunFolderError(
            f"{out_dir} was started with a different config ({', '.join(differ)} "
            f"differ); resume with the same config or use another out_dir"
        )
    return "finished" if is_finished(out_dir) else "resume"


def final_table(
    paths: str | Path | Iterable[str | Path], columns: Iterable[str] = ("valid_ntp", "prev_ntp", "forgetting")
) -> pd.DataFrame:
    """One row per run found under `paths`, indexed by run name: status, stop reason, tokens,
    pure train-step time and the final evaluation's `columns` (NaN where a run lacks one)."""
    roots = [paths] if isinstance(paths, (str, Path)) else list(paths)
    records = []
    for run_dir in (r for root in roots for r in find_runs(root)):
        summary = read_summary(run_dir) or {}
        rows = read_metrics(run_dir)
        final = summary.get("final") or (rows[-1] if rows else {})
        records.append(
            {
                "run": run_dir.name,
                "status": summary.get("status", "running"),
                "stop_reason": summary.get("stop_reason"),
                "tokens": final.get("tokens"),
                "train_time_s": summary.get("train_time_s"),
                **{c: final.get(c, float("nan")) for c in columns},
            }
        )
    return pd.DataFrame.from_records(records, index="run") if records else pd.DataFrame()
