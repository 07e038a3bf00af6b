"""Running sweeps: every point of a spec (see `sweep_spec`), resumable, failures recorded.

`run_sweep(spec)` runs the stages in order. A finished point whose folder matches its config is
skipped (`done`); an interrupted one resumes from its checkpoint; a failed one is retried. A
point that fails is recorded (traceback in `<point>/error.txt`) and does not stop the others;
points whose parent did not finish in this sweep, or whose parent's folder no longer matches the
spec, are `blocked`. A finished folder made with a different config is never reused: the point
fails with the differing keys. Each point runs as a papermill-executed copy of
`notebooks/train_run.ipynb` (the executed notebook in the point's folder is its log) or, with
`notebook=False`, as a direct `train_and_evaluate` call. `<out>/sweep.json` records the last
status of every point. Ctrl-C stops the sweep: queued points are cancelled, and everything
already written stays resumable.

One sweep per spec output at a time: a second `run_sweep` on the same `out` is refused (the lock
`<out>/.sweep.lock` names its holder). Sweeps of different specs may share a stage folder (the
figures share their pretraining stage): a point another process is training is waited for, then
used as it finished; each run folder has its own lock (runs.lock).

`load_stage(spec, stage)` reads the finished points' results back as one DataFrame.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import pandas as pd

from .. import config as config_lib, locks, runs
from ..config import ConfigError
from ..fileio import atomic_write_json, atomic_write_text
from .sweep_spec import Point, Spec, SweepError, load_spec, plan

__all__ = [
    "SweepError",
    "load_spec",
    "plan",
    "run_sweep",
    "run_point",
    "check",
    "load_stage",
    "stage_status",
    "summary_table",
]

RUN_NOTEBOOK = "train_run"
SUMMARY_COLUMNS = (
    "stage",
    "point",
    "status",
    "seconds",
    "stop_reason",
    "train_time_s",
    "tokens",
    "valid_ntp",
    "prev_ntp",
    "forgetting",
    "error",
)
FINAL_METRICS = ("tokens", "valid_ntp", "prev_ntp", "forgetting")  # from the run's last evaluation
OK = ("done", "finished")
SWEEP_LOCK = ".sweep.lock"


def run_point(point: Point, *, notebook: bool = True) -> dict[str, Any]:
    """Run (or resume, or just report) one point; returns its record. Never raises on a failed
    run (it is recorded); an interrupt (Ctrl-C) propagates."""
    start, record = time.perf_counter(), _record(point)
    try:
        locks.wait_until_free(point.out_dir / runs.LOCK, f"sweep point {point.stage}/{point.id}", log=print)
        if runs.is_finished(point.out_dir) and _same_config(point):
            record["status"] = "done"
        else:
            _train(point, notebook)
            record["status"] = "finished" if runs.is_finished(point.out_dir) else "failed"
            if record["status"] == "failed":
                summary = runs.read_summary(point.out_dir) or {}
                record["error"] = (
                    f"ended with status {summary.get('status')}: {summary.get('stop_reason')}"
                    if summary
                    else "ended without a summary (see the executed notebook in its folder)"
                )
    except Exception as err:  # noqa: BLE001 - a failed point is recorded, the sweep goes on
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        point.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(point.out_dir / "error.txt", traceback.format_exc())
    record["seconds"] = time.perf_counter() - start
    return record


def _record(point: Point, **values: Any) -> dict[str, Any]:
    return {
        "stage": point.stage,
        "point": point.id,
        "parent": point.parent,
        "out_dir": str(point.out_dir),
        **values,
    }


def _same_config(point: Point) -> bool:
    """True if the point's finished folder was made with its config; a different config raises a
    RunFolderError naming the differing keys and the fix."""
    from ..engine.finetune import resolve

    cfg = resolve(point.config())
    try:
        state = runs.prepare_run_dir(
            cfg.to_dict(), point.out_dir, resume=True, overwrite=False, defaults=config_lib.Config().to_dict()
        )
    except runs.RunFolderError as err:
        raise runs.RunFolderError(
            f"{err}. For a sweep point: revert the spec, or delete "
            f"{point.out_dir} to run the point again with the new config"
        ) from None
    return state == "finished"


def _train(point: Point, notebook: bool) -> None:
    if notebook:
        from ..engine.finetune import resolve
        from .notebooks import run_notebook

        config = resolve(point.config()).to_dict()  # resolved here: the notebook gets every key
        run_notebook(RUN_NOTEBOOK, {"config": config, "out_dir": str(point.out_dir)}, point.out_dir)
    else:
        from ..engine.train import train_and_evaluate

        train_and_evaluate(point.config(), point.out_dir, resume=True)
    (point.out_dir / "error.txt").unlink(missing_ok=True)


def run_sweep(
    spec: str | Path | Mapping[str, Any] | Spec,
    *,
    workers: int = 1,
    notebook: bool = True,
    stages: Iterable[str] | None = None,
    executor: Any = None,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Run every point of `spec` (or of the named `stages`), `workers` at a time; see the module
    docstring. Returns the summary table (one row per point, in plan order), and merges the
    records into `<out>/sweep.json`.

    `executor`: any object with `submit(fn, *args, **kw) -> future with .result()` (a
    `concurrent.futures` executor, or a cluster executor with that interface) instead of the
    built-in choice: the calling thread for workers=1, threads driving papermill kernels for
    notebooks, spawned processes otherwise.
    """
    spec = load_spec(spec)
    points = check(spec)
    with locks.hold(spec.out / SWEEP_LOCK, f"the sweep output {spec.out}"):
        return _run_stages(spec, points, workers, notebook, stages, executor, log)


def check(spec: str | Path | Mapping[str, Any] | Spec) -> list[Point]:
    """Every point of the spec, each config loaded and validated (what `run_sweep` and
    `sweep --dry-run` check before any training: a typo or a bad value fails here)."""
    points = plan(spec)
    for p in points:
        try:
            p.config()  # the parent link is a path that need not exist yet: not checked here
        except ConfigError as err:
            raise SweepError(f"sweep point {p.stage}/{p.id}: {err}") from None
    return points


def _run_stages(
    spec: Spec,
    points: list[Point],
    workers: int,
    notebook: bool,
    stages: Iterable[str] | None,
    executor: Any,
    log: Callable[[str], None],
) -> pd.DataFrame:
    names = [s.name for s in spec.stages]
    wanted = set(stages) if stages is not None else set(names)
    if wanted - set(names):
        raise SweepError(
            f"no stage {', '.join(sorted(wanted - set(names)))} in the sweep (stages: {', '.join(names)})"
        )
    parents, valid = _parents(points), _validator(points)
    records: dict[tuple[str, str], dict[str, Any]] = {}

    def parent_ok(point: Point) -> bool:  # finished in this sweep, or earlier with this spec
        parent = parents[id(point)]
        record = records.get((parent.stage, parent.id))
        return record["status"] in OK if record else valid(parent)

    start = time.perf_counter()
    for stage in (s for s in spec.stages if s.name in wanted):
        ready, blocked = [], []
        for p in (p for p in points if p.stage == stage.name):
            (ready if p.parent is None or parent_ok(p) else blocked).append(p)
        for p in blocked:
            records[(p.stage, p.id)] = _record(
                p, status="blocked", seconds=0.0, error=f"parent {stage.after}/{p.parent} is not finished"
            )
        log(f"sweep: stage {stage.name}: {len(ready) + len(blocked)} points ({len(blocked)} blocked)")
        for record in _execute(ready, workers=workers, notebook=notebook, executor=executor):
            records[(record["stage"], record["point"])] = record
            log(
                f"sweep: {record['stage']}/{record['point']}: {record['status']} "
                f"({record['seconds']:.0f} s){': ' + record['error'] if record.get('error') else ''}"
            )
            _write_records(spec.out, records)
        _write_records(spec.out, records)
    table = summary_table([records[k] for k in ((p.stage, p.id) for p in points) if k in records])
    log(f"sweep: {len(table)} points in {time.perf_counter() - start:.0f} s\n{table.to_string()}")
    return table


def _execute(points: list[Point], *, workers: int, notebook: bool, executor: Any) -> Iterator[dict[str, Any]]:
    """Records of `points` as they complete. Ctrl-C cancels the points not started yet."""
    if executor is None and workers <= 1:
        yield from (run_point(p, notebook=notebook) for p in points)
        return
    owned = executor is None
    if owned:
        executor = (
            cf.ThreadPoolExecutor(workers)
            if notebook
            else cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        )
    from .notebooks import plain_progress

    try:
        with plain_progress():  # set once for all kernels (threads must not race on os.environ)
            futures = {executor.submit(run_point, p, notebook=notebook): p for p in points}
            plain = all(isinstance(f, cf.Future) for f in futures)
            for future in cf.as_completed(futures) if plain else futures:
                try:
                    yield future.result()
                except Exception as err:  # noqa: BLE001 - the executor lost the point (killed worker)
                    yield _record(
                        futures[future],
                        status="failed",
                        seconds=0.0,
                        error=f"{type(err).__name__} in the executor: {err}",
                    )
    except BaseException:
        if owned:
            executor.shutdown(wait=False, cancel_futures=True)
        raise
    if owned:
        executor.shutdown(wait=True)


def _write_records(out: Path, records: Mapping[tuple[str, str], dict[str, Any]]) -> None:
    """Merge this sweep's records into `<out>/sweep.json` (points of other stages are kept)."""
    path = out / "sweep.json"
    try:
        earlier = json.loads(path.read_text())["points"] if path.exists() else []
    except (json.JSONDecodeError, KeyError, TypeError):
        earlier = []
    merged = {(r["stage"], r["point"]): r for r in earlier}
    merged.update(records)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"points": list(merged.values())})


def summary_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per point: stage, id, status, seconds, error and the final metrics of its run."""
    rows = []
    for r in records:
        summary = runs.read_summary(r["out_dir"]) or {}
        final = summary.get("final") or {}
        rows.append(
            {
                "stage": r["stage"],
                "point": r["point"],
                "status": r["status"],
                "seconds": round(r.get("seconds", 0.0), 1),
                "stop_reason": summary.get("stop_reason"),
                "train_time_s": summary.get("train_time_s"),
                "error": r.get("error"),
                **{c: final.get(c) for c in FINAL_METRICS},
            }
        )
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def load_stage(
    spec: str | Path | Mapping[str, Any] | Spec, stage: str, *, finished_only: bool = True
) -> pd.DataFrame:
    """`runs.load_runs` of the stage's points, plus one column per grid axis: `axis.<axis>` holding
    the point's label (a parent stage's axes: `axis.<stage>.<axis>`). By default only points
    that finished with the spec's current config, from parents that did too (a stale or failed
    folder is left out); `finished_only=False` also returns unfinished runs (to watch a sweep)."""
    points = plan(spec)
    stage_points = [p for p in points if p.stage == stage]
    if not stage_points:
        raise SweepError(
            f"the sweep has no stage {stage!r} (stages: {', '.join(s.name for s in load_spec(spec).stages)})"
        )
    valid = _validator(points)
    frames = []
    for p in stage_points:
        if not (p.out_dir / runs.CONFIG).exists() or (finished_only and not valid(p)):
            continue
        df = runs.load_runs(p.out_dir)
        if len(df):
            frames.append(df.assign(**{f"axis.{k}": v for k, v in p.labels}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _parents(points: list[Point]) -> dict[int, Point]:
    """id(point) -> its parent point (a child's model.load_path is its parent's folder)."""
    by_dir = {str(p.out_dir): p for p in points}
    return {id(p): by_dir[dict(p.overrides)["model.load_path"]] for p in points if p.parent is not None}


def _validator(points: list[Point]) -> Callable[[Point], bool]:
    """valid(point): the point and all its ancestors finished with the spec's current config."""
    parents, cache = _parents(points), {}

    def valid(point: Point) -> bool:
        if id(point) not in cache:
            try:
                ok = runs.is_finished(point.out_dir) and _same_config(point)
            except Exception:  # noqa: BLE001 - stale (config differs) or unreadable: not this spec's
                ok = False
            cache[id(point)] = ok and (point.parent is None or valid(parents[id(point)]))
        return cache[id(point)]

    return valid


def stage_status(spec: str | Path | Mapping[str, Any] | Spec, stage: str) -> dict[str, int]:
    """How many of the stage's points have a finished run matching the spec (parents included),
    out of how many."""
    points = plan(spec)
    valid = _validator(points)
    stage_points = [p for p in points if p.stage == stage]
    return {"finished": sum(valid(p) for p in stage_points), "points": len(stage_points)}
