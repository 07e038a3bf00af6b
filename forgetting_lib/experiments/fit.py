"""Will a sweep fit on its accelerator? Each stage's distinct programs compiled ahead of time.

`python -m forgetting_lib fit SPEC` walks the stages of a sweep spec (or a figure's parameter
file, or one run config) as `sweep --dry-run` does: every point's config, a finetune's
architecture taken from its parent point's config (the parent need not have run). Points of a
stage that differ only in values the programs hold as constants (learning rate, coefficient,
seeds, stop rules, paths) compile the same programs, so each stage is compiled once per distinct
`aot.shape_key`. Each one is compiled from shapes alone (engine/aot.py: no data, no device
memory) for the target platform, and tabulated: parameters, activation dtype, microbatches,
compiled and analytic FLOPs per train step, the step's memory, the run's peak memory (step,
evaluators, teacher passes and replay sampler with every buffer the run keeps alive), and
whether that fits the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from .. import config as config_lib, runs, runtime
from ..config import ConfigError
from ..engine import aot
from ..engine.sharding import MeshError, Placement, make_mesh
from ..fileio import FileFormatError, read_yaml
from . import cost, sweep_spec
from .sweep_spec import Point

COLUMNS = (
    *(
        "stage",
        "points",
        "example",
        "params",
        "dtype",
        "microbatches",
        "devices",
        "flops_per_step",
        "flops_analytic",
    ),
    *("step_bytes", "peak_bytes", "peak_program", "fits", "note", "compile_s"),
)


def load_points(source: str | Path, overrides: Iterable[str] = ()) -> list[Point]:
    """The points of a sweep spec or figure parameter file (`sweep:` key), of a notebook's
    parameter file that names a `run_config` (with its `overrides` and `methods`), or of one run
    config (a single point); dotted `overrides` ("data.microbatch_rows=64") are applied to every
    point last."""
    extra = tuple(config_lib.parse_override(item) for item in overrides)
    return [dataclasses.replace(p, overrides=p.overrides + extra) for p in _points(source)]


def _points(source: str | Path) -> list[Point]:
    path = Path(source)
    try:
        raw = read_yaml(path) if path.is_file() else None
    except FileFormatError as err:
        raise ConfigError(str(err)) from None
    if raw is None:
        raise ConfigError(f"{path} does not exist (give a sweep spec, figure parameter file or run config)")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping")
    if "sweep" in raw or "stages" in raw or ("out" in raw and "base" in raw):
        return sweep_spec.plan(path)
    stage: dict[str, Any] = {"base": str(path)}
    if "run_config" in raw:  # a notebook's parameter file (03_pretrain, 04_finetune_replay)
        stage = {"base": raw["run_config"], "set": dict(raw.get("overrides") or {})}
        if raw.get("methods"):
            stage["grid"] = {"method": list(raw["methods"])}
    try:
        points = sweep_spec.plan({"out": "outputs/fit", "stages": {"run": stage}})
        points[0].config()  # a file of other keys fails here, not halfway through the table
        return points
    except ConfigError as err:
        raise ConfigError(
            f"{path} is not a sweep spec (no `sweep:` key) and not a run config: {err}"
        ) from None


def fit_table(
    points: Iterable[Point],
    *,
    platform: str = "gpu",
    dtype: str | None = None,
    device_memory_gb: float = 80.0,
    stages: Iterable[str] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """One row per stage and distinct program shapes (see the module docstring); `stages` keeps
    only those stages (their parents are still read for the architecture); `on_row(row)` is
    called as each row is done (compiling a paper-scale stage takes seconds to a minute)."""
    points = list(points)
    configs = cost.resolved_configs(points)
    known = {str(p.out_dir) for p in points}
    wanted = None if stages is None else set(stages)
    unknown = set() if wanted is None else wanted - {p.stage for p in points}
    if unknown:
        names = ", ".join(dict.fromkeys(p.stage for p in points))
        raise ConfigError(f"--stages {', '.join(sorted(unknown))}: no such stage (stages: {names})")
    groups: dict[tuple[str, Any], list[tuple[Point, config_lib.Config, int | None]]] = {}
    for p, cfg in zip(points, configs):
        if wanted is not None and p.stage not in wanted:
            continue
        steps = cost.planned_steps(cfg)[0]
        key = aot.shape_key(cfg, platform=platform, dtype=dtype, total_steps=steps)
        groups.setdefault((p.stage, key), []).append((p, cfg, steps))
    reports: dict[Any, dict[str, Any]] = {}  # the same programs in two stages compile once
    rows = []
    for (stage, key), members in groups.items():
        point, cfg, steps = members[0]
        mesh = _mesh(cfg)  # a config with `mesh:` compiles sharded: memory and FLOPs per device
        if key not in reports:
            reports[key] = aot.step_report(
                cfg, platform=platform, dtype=dtype, total_steps=steps, placement=Placement(mesh)
            )
        report = reports[key]
        devices = 1 if mesh is None else mesh.size
        link = cfg.model.load_path
        guessed = bool(link) and str(Path(link)) not in known and not _has_config(link)
        row = {
            "stage": stage,
            "points": len(members),
            "example": point.id,
            "params": report["params"],
            "dtype": report["dtype"],
            "microbatches": report["microbatches"],
            "devices": devices,
            "flops_per_step": report["flops_per_step"] * devices,  # all devices, as the analytic count
            "flops_analytic": cost.step_flops(cfg)[0],
            "step_bytes": report["step_bytes"],
            "peak_bytes": report["peak_bytes"],
            "peak_program": report["peak_program"],
            "fits": report["peak_bytes"] <= device_memory_gb * 1e9,
            "note": f"parent {link} not found: architecture as configured" if guessed else "",
            "compile_s": report["compile_s"],
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _mesh(cfg: config_lib.Config) -> Any:
    try:
        return make_mesh(cfg.mesh)
    except MeshError as err:
        raise MeshError(f"{err}; `fit --devices N` simulates N devices") from None


def _has_config(run_dir: str) -> bool:
    if run_dir.startswith(config_lib.HF_PREFIX):  # a Hugging Face folder (or a hub id not fetched)
        return (Path(run_dir.removeprefix(config_lib.HF_PREFIX)) / "config.json").is_file()
    try:
        runs.read_config(run_dir)
    except (runs.RunFolderError, ConfigError):
        return False
    return True


def format_table(table: pd.DataFrame, *, device_memory_gb: float = 80.0, platform: str = "gpu") -> str:
    """The fit table as text, headed by what it assumes."""
    shown = pd.DataFrame(
        {
            "stage": table["stage"],
            "points": table["points"],
            "example": table["example"].map(
                lambda s: s if len(s) <= 32 else "..." + s[-29:]
            ),  # own axes last
            "params": table["params"].map(lambda n: f"{n / 1e6:.3g}M"),
            "dtype": table["dtype"],
            "micro": table["microbatches"],
            "devices": table["devices"],
            "TFLOP/step": table["flops_per_step"].map(_tflops),
            "analytic": table["flops_analytic"].map(_tflops),
            "step GiB": table["step_bytes"].map(_gib),
            "peak GiB": table["peak_bytes"].map(_gib),
            "peak in": table["peak_program"],
            f"fits {device_memory_gb:g} GB": table["fits"].map({True: "yes", False: "NO"}),
        }
    )
    lines = [
        f"ahead-of-time fit check for {platform} (programs built for {platform}, compiled by this machine's "
        f"XLA: an estimate of the {platform} compile); one row per stage and distinct shapes; "
        f"peak = the run's largest footprint (train step, evaluation, teacher cache, replay "
        f"sampler, with every buffer it keeps alive, per device); step = the train step alone; "
        f"TFLOP/step over all devices",
        shown.to_string(index=False),
        *(_BF16_ON_CPU if (table["dtype"] == "bfloat16").any() and runtime.platform() == "cpu" else ()),
        *(f"  {r.stage}/{r.example}: {r.note}" for r in table.itertuples() if r.note),
    ]
    if not table["fits"].all():
        lines.append(
            "NO = does not fit: split each batch into gradient-accumulation slices "
            "(data.microbatch_rows, activations / slices) or recompute activations (model.remat=true)"
        )
    return "\n".join(lines)


# measured: a bf16 and an f32 compile of params/paper/pretrain.yaml's step have the same temps
_BF16_ON_CPU = (
    "bfloat16 compiled on a CPU: XLA's CPU compiler keeps bf16 activations in float32 buffers, so "
    "activations count about as in float32: likely above an accelerator's (at most ~2x)",
)


def _tflops(x: float) -> str:
    return f"{x / 1e12:.3g}"


def _gib(x: float) -> str:
    return f"{x / aot.GiB:.3g}"
