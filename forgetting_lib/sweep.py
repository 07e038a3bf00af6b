"""Sweeps: a base config plus grid axes, expanded to points with stable ids, run and resumed.

A spec is a YAML mapping (a file, the `sweep:` key of a figure's parameter file, or a dict)::

    out: outputs/figures/quick/method_comp    # point folders: <out>/<stage>/<point id>
    stages:
      pretrain:
        base: params/quick/pretrain.yaml      # run config: a file or a mapping
        set: {data.valid_tokens: 20000}       # dotted overrides applied to every point
        grid: {opt.lr: [1.0e-3, 3.0e-3]}      # axes; the stage's points are their product
        out: outputs/figures/quick/pretrain   # optional: this stage's own folder (sharable)
      finetune:
        base: params/quick/finetune.yaml
        after: pretrain                       # the grid once per pretrain point, each with
        grid:                                 # model.load_path = that point's run folder
          method:                             # a named axis: label -> dotted overrides
            standard: {reg.method: none}
            kl_self: {reg.method: kl_pre, reg.synth: true}

A spec without `stages` is a single stage called `runs` (`base`, `set`, `grid` at the top).
A point's id is made of its axis labels (`lr=0.001__method=kl_self`, prefixed by the parent's id
in a dependent stage), so rerunning a spec finds the same folders: finished points are skipped,
interrupted ones resume from their checkpoint, failed ones are retried. A point that fails is
recorded (its traceback in `<point>/error.txt`) and does not stop the others; points whose
parent failed are `blocked`. Each point runs as a papermill-executed copy of
`notebooks/train_run.ipynb` (the executed notebook in the point's folder is its log) or, with
`notebook=False`, as a direct `train_and_evaluate` call. `<out>/sweep.json` records every point.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import re
import time
import traceback
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import yaml

from . import config as config_lib, runs
from .config import ConfigError
from .fileio import atomic_write_json, atomic_write_text

RUN_NOTEBOOK = "train_run"
STAGE_KEYS = ("base", "set", "grid", "after", "out")
SUMMARY_COLUMNS = ("tokens", "valid_ntp", "prev_ntp", "forgetting")


class SweepError(ConfigError):
    """A sweep spec is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class Stage:
    name: str
    base: str | Mapping[str, Any]
    set: tuple[tuple[str, Any], ...]
    axes: tuple[tuple[str, tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]], ...]  # axis -> (label, overrides)
    after: str | None
    out: Path


@dataclass(frozen=True)
class Spec:
    out: Path                  # where sweep.json goes (and stages without their own `out`)
    stages: tuple[Stage, ...]  # in run order: a stage comes after the one it depends on


@dataclass(frozen=True)
class Point:
    stage: str
    id: str
    overrides: tuple[tuple[str, Any], ...]  # set + axis values (+ run.name, model.load_path)
    out_dir: Path
    parent: str | None                      # the parent point's id (dependent stages)
    base: str | Mapping[str, Any]
    labels: tuple[tuple[str, str], ...] = ()  # axis -> label; a parent's axes as <stage>.<axis>

    def config(self) -> config_lib.Config:
        return config_lib.load(self.base, list(self.overrides))


def load_spec(source: str | Path | Mapping[str, Any] | Spec) -> Spec:
    """A validated spec from a file or mapping (or its `sweep:` key); stages in run order."""
    if isinstance(source, Spec):
        return source
    name = str(source) if not isinstance(source, Mapping) else "sweep spec"
    if not isinstance(source, Mapping):
        path = Path(source)
        if not path.is_file():
            raise SweepError(f"sweep spec {path} does not exist")
        source = yaml.safe_load(path.read_text()) or {}
    raw = source.get("sweep", source) if isinstance(source, Mapping) else source
    if not isinstance(raw, Mapping) or "out" not in raw:
        raise SweepError(f"{name}: a sweep spec is a mapping with `out` (the folder of its points) "
                         f"and `stages` (or `base`/`grid` for one stage)")
    stages_raw = raw.get("stages") or {"runs": {k: v for k, v in raw.items() if k in STAGE_KEYS and k != "out"}}
    unknown = set(raw) - {"out", "stages", *STAGE_KEYS}
    if unknown:
        raise SweepError(f"{name}: unknown key(s) {', '.join(sorted(unknown))}; a spec has out, stages")
    stages = [_stage(name, stage, body, Path(raw["out"])) for stage, body in stages_raw.items()]
    return Spec(Path(raw["out"]), tuple(_ordered(name, stages)))


def _stage(spec: str, name: str, body: Any, out: Path) -> Stage:
    where = f"{spec}: stage {name}"
    if not isinstance(body, Mapping) or "base" not in body:
        raise SweepError(f"{where} needs `base` (a run config file or mapping)")
    unknown = set(body) - set(STAGE_KEYS)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(STAGE_KEYS)}")
    axes = []
    for axis, values in (body.get("grid") or {}).items():
        if isinstance(values, Mapping):  # named axis: label -> overrides
            choices = tuple((str(label), tuple(dict(ov or {}).items())) for label, ov in values.items())
        elif isinstance(values, list) and values:
            if "." not in axis:
                raise SweepError(f"{where}: grid axis {axis!r} lists values, so it must be a dotted "
                                 f"config key (e.g. opt.lr); a named axis maps labels to overrides")
            choices = tuple((_label(v), ((axis, v),)) for v in values)
        else:
            raise SweepError(f"{where}: grid axis {axis!r} must be a non-empty list of values or a "
                             f"mapping of label -> overrides")
        axes.append((axis, choices))
    return Stage(name, body["base"], tuple(dict(body.get("set") or {}).items()), tuple(axes),
                 body.get("after"), Path(body.get("out") or out / name))


def _ordered(spec: str, stages: list[Stage]) -> list[Stage]:
    names = {s.name for s in stages}
    for s in stages:
        if s.after is not None and s.after not in names:
            raise SweepError(f"{spec}: stage {s.name} runs after {s.after!r}, which is not a stage "
                             f"({', '.join(sorted(names))})")
    ordered: list[Stage] = []
    while len(ordered) < len(stages):
        ready = [s for s in stages if s not in ordered and (s.after is None or s.after in {o.name for o in ordered})]
        if not ready:
            raise SweepError(f"{spec}: the stages' `after` keys form a cycle")
        ordered.extend(ready)
    return ordered


def _label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def expand(stage: Stage, parents: Iterable[Point] = (None,)) -> list[Point]:
    """The points of `stage`: the product of its axes, once per parent point (or once)."""
    points = []
    for parent in parents:
        for combo in product(*(choices for _, choices in stage.axes)):
            labels = tuple((axis.rsplit(".", 1)[-1], label) for (axis, _), (label, _) in zip(stage.axes, combo))
            own = "__".join(f"{axis}={label}" for axis, label in labels)
            pid = _safe("__".join(p for p in (parent.id if parent else "", own) if p) or "base")
            inherited = tuple((f"{parent.stage}.{k}", v) for k, v in parent.labels) if parent else ()
            overrides = [*stage.set, *(kv for _, ov in combo for kv in ov), ("run.name", pid),
                         ("run.experiment", stage.name)]
            if parent is not None:
                overrides.append(("model.load_path", str(parent.out_dir)))
            points.append(Point(stage.name, pid, tuple(overrides), stage.out / pid,
                                parent.id if parent else None, stage.base, inherited + labels))
    return points


def plan(spec: str | Path | Mapping[str, Any] | Spec) -> list[Point]:
    """Every point of every stage (dependent stages expanded over all parent points)."""
    by_stage: dict[str, list[Point]] = {}
    for stage in load_spec(spec).stages:
        by_stage[stage.name] = expand(stage, by_stage[stage.after] if stage.after else (None,))
    return [p for points in by_stage.values() for p in points]


def load_stage(spec: str | Path | Mapping[str, Any] | Spec, stage: str) -> pd.DataFrame:
    """`runs.load_runs` of the stage's points that have results, plus one column per grid axis:
    `axis.<axis>` holding the point's label (a parent stage's axes: `axis.<stage>.<axis>`)."""
    points = [p for p in plan(spec) if p.stage == stage]
    if not points:
        raise SweepError(f"the sweep has no stage {stage!r} (stages: "
                         f"{', '.join(s.name for s in load_spec(spec).stages)})")
    frames = []
    for p in points:
        df = runs.load_runs(p.out_dir) if (p.out_dir / runs.CONFIG).exists() else pd.DataFrame()
        if len(df):
            frames.append(df.assign(**{f"axis.{k}": v for k, v in p.labels}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _check_configs(points: list[Point]) -> None:
    """Fail before any training if a point's config is invalid (typo, bad value)."""
    for p in points:
        try:
            p.config()  # the parent link is a path that need not exist yet: not checked here
        except ConfigError as err:
            raise SweepError(f"sweep point {p.stage}/{p.id}: {err}") from None


def run_point(point: Point, *, notebook: bool = True) -> dict[str, Any]:
    """Run (or resume, or just report) one point; returns its record. Never raises."""
    start, record = time.perf_counter(), {"stage": point.stage, "point": point.id,
                                          "parent": point.parent, "out_dir": str(point.out_dir)}
    try:
        if runs.is_finished(point.out_dir) and _same_config(point):
            record["status"] = "done"
        else:
            _train(point, notebook)
            record["status"] = "finished" if runs.is_finished(point.out_dir) else "failed"
            if record["status"] == "failed":
                record["error"] = f"ended with status {(runs.read_summary(point.out_dir) or {}).get('status')}"
    except Exception as err:  # noqa: BLE001 - a failed point is recorded, the sweep goes on
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        point.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(point.out_dir / "error.txt", traceback.format_exc())
    record["seconds"] = time.perf_counter() - start
    return record


def _same_config(point: Point) -> bool:
    """A finished point's folder matches its config (else prepare_run_dir raises, naming keys)."""
    from .finetune import resolve

    cfg = resolve(point.config())
    state = runs.prepare_run_dir(cfg.to_dict(), point.out_dir, resume=True, overwrite=False,
                                 defaults=config_lib.Config().to_dict())
    return state == "finished"


def _train(point: Point, notebook: bool) -> None:
    if notebook:
        from .notebooks import run_notebook

        run_notebook(RUN_NOTEBOOK, {"config": point.config().to_dict(), "out_dir": str(point.out_dir)},
                     point.out_dir)
    else:
        from .train import train_and_evaluate

        train_and_evaluate(point.config(), point.out_dir, resume=True)
    (point.out_dir / "error.txt").unlink(missing_ok=True)


def run_sweep(spec: str | Path | Mapping[str, Any] | Spec, *, workers: int = 1, notebook: bool = True,
              stages: Iterable[str] | None = None, executor: Any = None,
              log: Callable[[str], None] = print) -> pd.DataFrame:
    """Run every point of `spec` (or of the named `stages`), `workers` at a time; see the module
    docstring. Returns the summary table (one row per point), also written to `<out>/sweep.json`.

    `executor`: any object with `submit(fn, *args) -> future with .result()` (e.g. a
    `concurrent.futures` executor, or a cluster executor with that interface) used instead of the
    built-in choice: in-process for workers=1 without notebooks, threads driving papermill
    kernels with notebooks, spawned processes otherwise.
    """
    spec = load_spec(spec)
    wanted = set(stages) if stages is not None else {s.name for s in spec.stages}
    _check_configs(plan(spec))
    records: dict[tuple[str, str], dict[str, Any]] = {}
    start = time.perf_counter()
    for stage in spec.stages:
        if stage.name not in wanted:
            continue
        points = [p for p in plan(spec) if p.stage == stage.name]
        ready = [p for p in points if p.parent is None or runs.is_finished(dict(p.overrides)["model.load_path"])]
        for p in (p for p in points if p not in ready):
            records[(p.stage, p.id)] = {"stage": p.stage, "point": p.id, "parent": p.parent,
                                        "out_dir": str(p.out_dir), "status": "blocked", "seconds": 0.0,
                                        "error": f"parent {stage.after}/{p.parent} is not finished"}
        log(f"sweep: stage {stage.name}: {len(points)} points ({len(points) - len(ready)} blocked)")
        for record in _execute(ready, workers=workers, notebook=notebook, executor=executor):
            records[(record["stage"], record["point"])] = record
            log(f"sweep: {record['stage']}/{record['point']}: {record['status']} "
                f"({record['seconds']:.0f} s){': ' + record['error'] if record.get('error') else ''}")
            _write_record(spec.out, records)
        _write_record(spec.out, records)
    table = summary_table([records[k] for k in ((p.stage, p.id) for p in plan(spec)) if k in records])
    log(f"sweep: {len(table)} points in {time.perf_counter() - start:.0f} s\n{table.to_string()}")
    return table


def _execute(points: list[Point], *, workers: int, notebook: bool, executor: Any) -> Iterable[dict[str, Any]]:
    """Records of `points` as they complete."""
    if executor is None and workers <= 1 and not notebook:
        yield from (run_point(p, notebook=False) for p in points)
        return
    owned = executor is None
    if owned:
        executor = (cf.ThreadPoolExecutor(max(workers, 1)) if notebook else
                    cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")))
    try:
        futures = [executor.submit(run_point, p, notebook=notebook) for p in points]
        if all(isinstance(f, cf.Future) for f in futures):
            yield from (f.result() for f in cf.as_completed(futures))
        else:
            yield from (f.result() for f in futures)
    finally:
        if owned:
            executor.shutdown(wait=True)


def _write_record(out: Path, records: Mapping[tuple[str, str], dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", {"points": list(records.values())})


def summary_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per point: stage, id, status, seconds, error and the final metrics of its run."""
    rows = []
    for r in records:
        summary = runs.read_summary(r["out_dir"]) or {}
        final = summary.get("final") or {}
        rows.append({"stage": r["stage"], "point": r["point"], "status": r["status"],
                     "seconds": round(r.get("seconds", 0.0), 1), "stop_reason": summary.get("stop_reason"),
                     "train_time_s": summary.get("train_time_s"),
                     **{c: final.get(c) for c in SUMMARY_COLUMNS}, "error": r.get("error")})
    return pd.DataFrame(rows)
