"""Run folders and the one reader of their results.

A run folder `outputs/<experiment>/<run>/` holds `config.yaml` (fully resolved), `metrics.jsonl`
(one JSON row per evaluation), `summary.json` (status, stop reason, final metrics) and
`checkpoint/`, and for a finetune with replay `replay_rows.npy` (the replay rows of its first
steps, [n, T] token ids, for `engine/diagnostics.py`). `load_runs` turns any number of run
folders into one tidy DataFrame; plots and analysis read results only through it.

Paths inside `config.yaml` (data, mix, parent: `config.PATH_KEYS`) are stored relative to the run
folder and read back relative to it, so a run folder stays valid when it is opened from another
directory, or moved together with what it names (a sweep with its pretraining stage, `outputs/`
as a whole). The file also records where the folder was when it was written (`written_at`): a
path that no longer resolves from the folder's new place is looked up from the old one, so a
sweep folder moved on its own still finds token files that stayed where they were.

One process writes a run folder at a time: `lock(run_dir)` holds `<run_dir>/.lock`
(`locks.hold`); a second writer gets a LockedError naming the first.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import yaml

from . import config as config_lib, locks
from .fileio import (
    FileFormatError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_yaml,
    remove_temporaries,
)

if TYPE_CHECKING:  # pandas loads on first use: a training process never needs it (0.3 s)
    import pandas as pd

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.yaml", "metrics.jsonl", "summary.json", "checkpoint"
REPLAY_ROWS = "replay_rows.npy"
LOCK = ".lock"
# Leftovers of a killed writer (atomic writes, checkpoint swaps); stale once the folder is locked.
TEMPORARIES = (".*.tmp", f".{CHECKPOINT}.tmp-*")


class RunFolderError(ValueError):
    """A run folder is in a state that the requested action would damage; the message says why."""


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one evaluation row (flushed and fsynced: a killed run keeps every finished row)."""
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl. A torn last line (the run was killed mid-write) is ignored; a
    bad line with rows after it is corruption, a RunFolderError naming the line."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as err:
            if number == len(lines):
                break
            raise RunFolderError(
                f"{path}:{number}: not a metrics row ({err}) and {len(lines) - number} rows follow it; "
                f"the file is damaged: repair or delete that line"
            ) from None
        rows.append(row)
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
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RunFolderError(
            f"{path} is damaged ({err}); delete it and resume the run (--resume) to write it again"
        ) from None


def write_replay_rows(run_dir: str | Path, rows: Any) -> None:
    """Store replay rows [n, T] (token ids, uint16 when they fit) as `replay_rows.npy`."""
    import numpy as np

    rows = np.asarray(rows)
    if rows.size and int(rows.max()) < 2**16 and int(rows.min()) >= 0:
        rows = rows.astype(np.uint16)
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    atomic_write_bytes(Path(run_dir) / REPLAY_ROWS, buffer.getvalue())


def read_replay_rows(run_dir: str | Path) -> Any:
    """The run's stored replay rows [n, T] int32, or None when it stored none (no replay, or a
    run from before replay rows were kept)."""
    import numpy as np

    path = Path(run_dir) / REPLAY_ROWS
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False).astype(np.int32)
    except (ValueError, OSError) as err:
        raise FileFormatError(
            f"{path}: not a readable .npy of token rows ({err}); delete it (only the replay "
            f"diagnostics read it) or rerun the run with --overwrite"
        ) from err


def write_config(run_dir: str | Path, config: dict[str, Any]) -> None:
    """Write `config.yaml` with its paths relative to the run folder (see the module docstring)."""
    stored = config_lib.paths_relative_to(config, run_dir)
    atomic_write_text(Path(run_dir) / CONFIG, yaml.safe_dump(stored, sort_keys=False))


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config, its paths resolved from the run folder (relative to the current
    directory where `run_dir` is). A config written before paths were stored relative to the
    folder (no `written_at`) is returned as written: its paths are relative to where it ran."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.exists():
        raise RunFolderError(f"{run_dir} is not a run folder (no {CONFIG})")
    try:
        raw = read_yaml(path)
    except FileFormatError as err:
        raise RunFolderError(f"{err} (a damaged run folder: restore {path} or start the run again)") from None
    if not isinstance(raw, dict):
        raise RunFolderError(f"{path} is damaged (not a mapping); start the run again (--overwrite)")
    return config_lib.paths_resolved_from(raw, run_dir)


def same_path(a: str, b: str) -> bool:
    """Whether two stored path values name the same thing (`hf:` folders compared as paths, hub
    ids as written)."""
    hf = config_lib.HF_PREFIX
    if a and b and a.startswith(hf) and b.startswith(hf):
        a, b = a[len(hf) :], b[len(hf) :]
        if not (os.path.isdir(a) or os.path.isdir(b)):
            return a == b
    elif a and b and (a.startswith(hf) or b.startswith(hf)):
        return False
    return os.path.abspath(a) == os.path.abspath(b) if a and b else a == b


@contextlib.contextmanager
def lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's lock (creating the folder); a second writer gets a LockedError."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with locks.hold(run_dir / LOCK, f"run folder {run_dir}"):
        yield


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete what killed writers left in the run folder (call it holding the folder's lock)."""
    return remove_temporaries(run_dir, TEMPORARIES)


def is_finished(run_dir: str | Path) -> bool:
    summary = read_summary(run_dir)
    return summary is not None and summary.get("status") == "finished"


def find_runs(root: str | Path) -> list[Path]:
    """Every run folder (holding config.yaml) under `root`, or `root` itself, sorted."""
    root = Path(root)
    if (root / CONFIG).exists():
        return [root]
    return sorted(p.parent for p in root.rglob(CONFIG))


def load_runs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per evaluation of every run found under `paths`.

    Columns: `run` (folder name), `experiment` (its parent's name), `path`, the metrics (`step`,
    `tokens`, `valid_ntp`, ...), `status` and `stop_reason` from the summary, and every config
    value as a dotted column (`opt.lr`, `model.D`, ...).
    """
    import pandas as pd

    roots = [paths] if isinstance(paths, (str, Path)) else list(paths)
    frames = []
    for run_dir in (r for root in roots for r in find_runs(root)):
        rows = read_metrics(run_dir)
        if not rows:
            continue
        flat = config_lib.flatten(read_config(run_dir))
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
    """Check `out_dir` for a run of `config`: "new" (nothing computed there yet: write the config
    with `write_config` once the run is known to start), "resume" (an unfinished run to continue)
    or "finished" (resume=True on a finished run: nothing to do). Call it holding `lock(out_dir)`.

    A folder that already holds a run is never reused silently: without `resume` or `overwrite`
    it is an error, and resuming with a different config is an error that lists the differences.
    A folder with a config but no metrics row and no checkpoint (the run was refused or died
    before its first evaluation) holds nothing and counts as new. A key missing from the stored
    config (written before that key existed) counts as its value in `defaults` (a `parent.*` key,
    derived from the parent, as matching), so adding a config field does not orphan earlier
    runs. `overwrite` empties the folder (keeping its lock).
    """
    if overwrite and out_dir.exists():
        clear_run_dir(out_dir)
    if not (out_dir / CONFIG).exists() or holds_nothing(out_dir):
        return "new"
    if not resume:
        state = "a finished" if is_finished(out_dir) else "an unfinished"
        raise RunFolderError(
            f"{out_dir} already holds {state} run; pass resume=True (CLI --resume) "
            f"to continue it or overwrite=True (--overwrite) to start again"
        )
    new, old = config_lib.flatten(config), config_lib.flatten(read_config(out_dir))
    if defaults is not None:
        flat_defaults = config_lib.flatten(defaults)
        # parent.* is derived from the parent: a key a later version records is taken as matching
        missing = {k: new[k] if k.startswith("parent.") else v for k, v in flat_defaults.items() if k in new}
        old = {**missing, **old}
    paths = set(config_lib.PATH_KEYS)
    differ = sorted(
        k
        for k in new.keys() | old.keys()
        if k not in config_lib.NEUTRAL_KEYS
        and not k.startswith(config_lib.NEUTRAL_SECTIONS)
        and not (same_path(new.get(k), old.get(k)) if k in paths else new.get(k) == old.get(k))
    )
    if differ:
        details = "; ".join(f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in differ[:4])
        raise RunFolderError(
            f"{out_dir} was started with a different config ({', '.join(differ)} differ: {details}"
            f"{'; ...' if len(differ) > 4 else ''}); resume with the same config or use another out_dir"
        )
    return "finished" if is_finished(out_dir) else "resume"


def holds_nothing(run_dir: Path) -> bool:
    """No metrics row and no checkpoint: nothing would be lost by starting afresh."""
    checkpoints = (run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old")  # engine/checkpoint.py's pair
    return not read_metrics(run_dir) and not any((c / "meta.json").is_file() for c in checkpoints)


def clear_run_dir(run_dir: Path) -> None:
    """Delete everything in the run folder except its lock file."""
    for child in run_dir.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def reset_run_files(run_dir: Path) -> None:
    """Delete the run's own files (config, metrics, summary, checkpoints), keeping anything else
    a caller keeps there (an executed notebook, a sweep's error.txt) and the lock."""
    for name in (CONFIG, METRICS, SUMMARY, REPLAY_ROWS):
        (run_dir / name).unlink(missing_ok=True)
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def discard_if_empty(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but its lock (a run refused before it started)."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {LOCK}:
        (run_dir / LOCK).unlink(missing_ok=True)  # the lock, released next, would remove it too
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def final_table(
    paths: str | Path | Iterable[str | Path], columns: Iterable[str] = ("valid_ntp", "prev_ntp", "forgetting")
) -> pd.DataFrame:
    """One row per run found under `paths`, indexed by run name: status, stop reason, tokens,
    pure train-step time and the final evaluation's `columns` (NaN where a run lacks one)."""
    import pandas as pd

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
