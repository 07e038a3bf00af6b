"""Sweep specs: a base config plus grid axes, expanded to points with stable, unique ids.

A spec is a YAML mapping (a file, the `sweep:` key of a figure's parameter file, or a dict)::

    out: outputs/figures/quick/method_comp    # sweep.json goes here (and stage folders)
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
          lr_and_method:                      # a named axis: label -> dotted overrides
            fast_standard: {opt.lr: 3.0e-3, method: standard}
            slow_kl_self: {opt.lr: 1.0e-4, method: kl_self}
          # method: [standard, kl_self, {ewc: {reg.coeff: 1000.0}}]   # an axis over named methods
        resources: {gpus: 1, cpus: 8, memory_gb: 64, time_min: 240, partition: gpu}

`resources` (optional, per stage) is what each of the stage's points asks a cluster for when the
sweep runs on one (`executors.RayExecutor`, `executors.SlurmExecutor`; the local runner ignores
it): `gpus` and `cpus` (integers), `memory_gb`, `time_min` (the SLURM time limit; Ray has none),
`partition` (SLURM) and `slurm` (a mapping of further sbatch options, e.g. `{constraint: h100}`).
It is not part of a point's config: changing it never makes a finished point stale.

The axis `method` may list names of the method table (`methods.METHODS`), each optionally refined
by its own overrides; its labels are the names. A spec without `stages` is a single stage called
`runs` (`base`, `set`, `grid` at the top).
A point's id is made of its axis labels (`lr=0.001__method=kl_self`, prefixed by the parent's id
in a dependent stage) and its folder is `<stage out>/<id>`: rerunning a spec finds the same
folders. Two points of a spec may never share a folder (checked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .. import config as config_lib, methods as methods_lib
from ..config import ConfigError
from ..fileio import read_yaml

STAGE_KEYS = ("base", "set", "grid", "after", "out", "resources")
# resources: key -> (what it must be, its check)
RESOURCE_KEYS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "gpus": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "cpus": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "memory_gb": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "time_min": ("a number of minutes > 0", lambda v: _is_number(v) and v > 0),
    "partition": ("a partition name", lambda v: isinstance(v, str) and bool(v)),
    "slurm": ("a mapping of sbatch options", lambda v: isinstance(v, Mapping)),
}
Overrides = tuple[tuple[str, Any], ...]  # (dotted key, value) pairs, applied in order
Resources = tuple[tuple[str, Any], ...]  # (resource key, value) pairs of a stage's `resources`


class SweepError(ConfigError):
    """A sweep spec is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class Stage:
    name: str
    base: str | Mapping[str, Any]  # run config file or mapping
    set: Overrides  # applied to every point
    axes: tuple[tuple[str, tuple[tuple[str, Overrides], ...]], ...]  # (axis, ((label, overrides), ...))
    after: str | None  # the stage whose points are this one's parents
    out: Path  # point folders: out/<point id>
    resources: Resources = ()  # what a cluster gives each point (RESOURCE_KEYS); not part of its config


@dataclass(frozen=True)
class Spec:
    out: Path  # where sweep.json goes (and stages without their own `out`)
    stages: tuple[Stage, ...]  # in run order: a stage comes after the one it depends on


@dataclass(frozen=True)
class Point:
    stage: str
    id: str
    overrides: Overrides  # set + axis values (+ run.name, model.load_path)
    out_dir: Path
    parent: str | None  # the parent point's id (dependent stages)
    base: str | Mapping[str, Any]
    labels: tuple[tuple[str, str], ...] = ()  # axis -> label; a parent's axes as <stage>.<axis>
    resources: Resources = ()  # its stage's `resources` (cluster executors only)

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
        source = read_yaml(path) or {}
    raw = source.get("sweep", source) if isinstance(source, Mapping) else source
    if not isinstance(raw, Mapping) or "out" not in raw:
        raise SweepError(
            f"{name}: a sweep spec is a mapping with `out` (the folder of its points) "
            f"and `stages` (or `base`/`grid` for one stage)"
        )
    unknown = set(raw) - {"out", "stages", *STAGE_KEYS}
    if unknown:
        raise SweepError(f"{name}: unknown key(s) {', '.join(sorted(unknown))}; a spec has out, stages")
    if "stages" in raw:
        stray = sorted(set(raw) & set(STAGE_KEYS) - {"out"})
        if stray:
            raise SweepError(
                f"{name}: {', '.join(stray)} at the top level would be ignored next to "
                f"`stages`; move them into a stage"
            )
        stages_raw = raw["stages"]
    else:
        stages_raw = {"runs": {k: v for k, v in raw.items() if k in STAGE_KEYS and k != "out"}}
    if not isinstance(stages_raw, Mapping) or not stages_raw:
        raise SweepError(f"{name}: `stages` must map stage names to stages")
    stages = [_stage(name, stage, body, Path(raw["out"])) for stage, body in stages_raw.items()]
    return Spec(Path(raw["out"]), tuple(_ordered(name, stages)))


def _stage(spec: str, name: str, body: Any, out: Path) -> Stage:
    where = f"{spec}: stage {name}"
    if not isinstance(body, Mapping) or "base" not in body:
        raise SweepError(f"{where} needs `base` (a run config file or mapping)")
    unknown = set(body) - set(STAGE_KEYS)
    if unknown:
        raise SweepError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(STAGE_KEYS)}"
        )
    axes = []
    for axis, values in (body.get("grid") or {}).items():
        if isinstance(values, Mapping) and values:  # named axis: label -> overrides
            bad = [label for label, ov in values.items() if not isinstance(ov or {}, Mapping)]
            if bad:
                raise SweepError(
                    f"{where}: grid axis {axis!r}: label {bad[0]!r} must map to dotted "
                    f"overrides, e.g. {{reg.method: none}}"
                )
            choices = tuple((str(label), tuple(dict(ov or {}).items())) for label, ov in values.items())
        elif isinstance(values, list) and values and axis == "method":  # names of methods.METHODS
            try:
                named = methods_lib.named(values)
            except KeyError as err:
                raise SweepError(f"{where}: grid axis 'method': {err.args[0]}") from None
            choices = tuple((label, tuple(ov.items())) for label, ov in named.items())
        elif isinstance(values, list) and values:
            if "." not in axis:
                raise SweepError(
                    f"{where}: grid axis {axis!r} lists values, so it must be a dotted "
                    f"config key (e.g. opt.lr); a named axis maps labels to overrides"
                )
            choices = tuple((_label(v), ((axis, v),)) for v in values)
        else:
            raise SweepError(
                f"{where}: grid axis {axis!r} must be a non-empty list of values or a "
                f"mapping of label -> overrides"
            )
        axes.append((axis, choices))
    return Stage(
        name,
        body["base"],
        tuple(dict(body.get("set") or {}).items()),
        tuple(axes),
        body.get("after"),
        Path(body.get("out") or out / name),
        _resources(where, body.get("resources")),
    )


def _resources(where: str, raw: Any) -> Resources:
    """A stage's `resources` mapping, checked key by key."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise SweepError(f"{where}: `resources` must be a mapping, e.g. {{gpus: 1, cpus: 8, memory_gb: 64}}")
    for key, value in raw.items():
        if key not in RESOURCE_KEYS:
            raise SweepError(f"{where}: unknown resources key {key!r}; valid: {', '.join(RESOURCE_KEYS)}")
        what, ok = RESOURCE_KEYS[key]
        if not ok(value):
            raise SweepError(f"{where}: resources.{key} must be {what}, not {value!r}")
    return tuple((k, dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ordered(spec: str, stages: list[Stage]) -> list[Stage]:
    names = {s.name for s in stages}
    for s in stages:
        if s.after is not None and s.after not in names:
            raise SweepError(
                f"{spec}: stage {s.name} runs after {s.after!r}, which is not a stage "
                f"({', '.join(sorted(names))})"
            )
    ordered: list[Stage] = []
    while len(ordered) < len(stages):
        ready = [
            s
            for s in stages
            if s not in ordered and (s.after is None or s.after in {o.name for o in ordered})
        ]
        if not ready:
            raise SweepError(f"{spec}: the stages' `after` keys form a cycle")
        ordered.extend(ready)
    return ordered


def _label(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)  # repr: shortest exact float


def _axis_names(stage: Stage) -> list[str]:
    """Short axis names (`opt.lr` -> `lr`), the full key where two axes would share one."""
    short = [axis.rsplit(".", 1)[-1] for axis, _ in stage.axes]
    return [s if short.count(s) == 1 else axis for s, (axis, _) in zip(short, stage.axes)]


def expand(stage: Stage, parents: Iterable[Point | None] = (None,)) -> list[Point]:
    """The points of `stage`: the product of its axes, once per parent point (or once)."""
    points, names = [], _axis_names(stage)
    for parent in parents:
        for combo in product(*(choices for _, choices in stage.axes)):
            labels = tuple((name, label) for name, (label, _) in zip(names, combo))
            own = "__".join(f"{axis}={label}" for axis, label in labels)
            pid = re.sub(
                r"[^A-Za-z0-9._=+-]",
                "-",
                "__".join(p for p in (parent.id if parent else "", own) if p) or "base",
            )
            inherited = tuple((f"{parent.stage}.{k}", v) for k, v in parent.labels) if parent else ()
            overrides = [
                *stage.set,
                *(kv for _, ov in combo for kv in ov),
                ("run.name", pid),
                ("run.experiment", stage.name),
            ]
            if parent is not None:
                overrides.append(("model.load_path", str(parent.out_dir)))
            points.append(
                Point(
                    stage.name,
                    pid,
                    tuple(overrides),
                    stage.out / pid,
                    parent.id if parent else None,
                    stage.base,
                    inherited + labels,
                    stage.resources,
                )
            )
    return points


def plan(spec: str | Path | Mapping[str, Any] | Spec) -> list[Point]:
    """Every point of every stage (dependent stages expanded over all parent points), checked
    for two points sharing a folder."""
    by_stage: dict[str, list[Point]] = {}
    for stage in load_spec(spec).stages:
        by_stage[stage.name] = expand(stage, by_stage[stage.after] if stage.after else (None,))
    points = [p for stage_points in by_stage.values() for p in stage_points]
    seen: dict[Path, Point] = {}
    for p in points:
        other = seen.setdefault(p.out_dir, p)
        if other is not p:
            raise SweepError(
                f"sweep points {other.stage}/{other.id} and {p.stage}/{p.id} would share "
                f"the folder {p.out_dir}: give their axis values distinct labels"
            )
    return points
