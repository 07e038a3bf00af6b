"""What a sweep will cost before it runs: planned training tokens, FLOPs and accelerator-hours.

Pure arithmetic on configs (the only file read is a token file's sidecar), printed by
`python -m forgetting_lib sweep SPEC --dry-run`. Per run, B = data.batch_size rows of T tokens:

    N = 12 L D^2 + D V         matmul parameters, blocks and unembedding (model.paper_param_count,
                               the paper's N for TPP); the untied input embedding is a gather
    C = 6 N + 12 L T D         training FLOPs per token (model.flops_per_token; attention over T)
    F = C / 3 = 2 N + 4 L T D  forward FLOPs per token (evaluation, the frozen parent)
    S = 2 N + 2 L T D          sampling FLOPs per token (KV cache: ~T/2 keys on average)

Planned tokens = steps x B T, steps as the engine sizes a run (`assemble.total_steps_for`) from
its length rule (config allows one): stop.num_tokens_train, stop.tokens_per_param x N, or
stop.num_epochs x train rows (sidecar num_tokens // T, less ceil(data.valid_tokens / T); without
the file: "unknown (token file missing)"). With stop.target_loss, patience or train_time_s as
well, that is an "upper bound"; with no length rule the run is "unbounded" (no FLOPs counted).

Training FLOPs = steps x (B T C + the regulariser's work per step) + one-off work, R replay rows
per step (reg.replay_batch_size, 0 = B; for `replace`, floor(coeff B) of the B rows, no extra):
    ntp_pre, kl_pre   + R T C                  replay rows, forward + backward
    kl_pre            + R T F                  the frozen parent's forward on them
    kl_dwn            + B T F                  the frozen parent's forward on the new rows
    reg.synth         + R T S / reg.reuse      sampling the replay rows (whole buffers)
    ewc, once         fisher_batches R T C     per-row gradients for the Fisher (+ sampling)
    LoRA              + 3 x 2 rank 12 L D^2    approximation: a full finetuning step (gradients
                                               flow through the merged W + A B) plus the merge
Evaluation FLOPs = E x F x evaluated tokens, E = 1 + ceil(steps / eval_every) (one before the
first step; eval_every = log.every_tokens / B T steps), over valid, mix and, for a finetune, the
parent's valid rows (prev); log.eval_kl adds the parent's forward over them, once per run if it
fits log.teacher_cache_mb, else at every evaluation. Eval-batch padding is ignored.

Accelerator-hours = (training + evaluation FLOPs) / (MFU x peak) / 3600; by default MFU 0.4 of
an H100 SXM's 989 dense bf16 TFLOP/s.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from .. import config as config_lib, runs
from ..config import ConfigError
from ..engine import data as data_lib, finetune, hf, model as model_lib, regularisers
from ..engine.assemble import total_steps_for
from ..engine.evaluate import teacher_forms
from ..engine.finetune import from_parent_config
from ..prep.binarize import TokenFileError, read_token_file
from .sweep_spec import Point

PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 (TFLOP/s)
MFU = 0.4  # model FLOPs utilisation assumed for accelerator-hours
EARLY_RULES = ("target_loss", "patience", "train_time_s")  # may end a run before its length
# regularisers whose term runs the frozen parent on the new rows (the registry has no flag for it;
# the parent's forward on replay rows is `frozen and replay_rows`)
TEACHER_ON_NEW_ROWS = ("kl_dwn",)
POINT_COLUMNS = (
    *("stage", "point", "tokens", "train_flops", "eval_flops", "length", "basis", "flops_per_token"),
)
TABLE_COLUMNS = (
    *("stage", "points", "tokens", "train_flops", "eval_flops", "accel_hours", "length"),
    *("basis", "flops_per_token"),  # how the length is set; (min, max) training FLOPs per token
)


@dataclass(frozen=True)
class PointCost:
    tokens: int | None  # planned training tokens, steps x B T (None: unknown or unbounded)
    length: str  # fixed | upper bound | unbounded | unknown
    basis: str  # how `tokens` was determined, e.g. "stop.tokens_per_param 20 x N 205.5M"
    train_flops: float | None  # training FLOPs, the regulariser's extra work included
    eval_flops: float | None  # evaluation FLOPs
    num_params: int  # N = 12 L D^2 + D V
    flops_per_token: float  # training FLOPs per training token (known even where tokens is not)


def with_parent(cfg: config_lib.Config, parent: config_lib.Config) -> config_lib.Config:
    """A finetune's config as `engine.finetune.resolve` makes it, but from its parent's config
    (the parent's run folder need not exist yet): the architecture and the parent's valid split."""
    return cfg.replace(from_parent_config(parent))


def planned_steps(cfg: config_lib.Config) -> tuple[int | None, str, str]:
    """(steps or None, length kind, basis) of a resolved config; see the module docstring."""
    s, d = cfg.stop, cfg.data
    early = [f"stop.{r}={getattr(s, r):g}" for r in EARLY_RULES if getattr(s, r) is not None]
    rule = next((r for r in config_lib.LENGTH_RULES if getattr(s, r) is not None), None)
    if rule is None:
        return None, "unbounded", f"unbounded (stops on {', '.join(early)})"
    per_epoch_step = 1.0  # read by total_steps_for for num_epochs only
    if rule == "num_tokens_train":
        basis = "stop.num_tokens_train"
    elif rule == "tokens_per_param":
        n = model_lib.paper_param_count(cfg.model)
        basis = f"stop.tokens_per_param {s.tokens_per_param:g} x N {_count(n)}"
    else:
        rows, why = train_rows(cfg)
        train_tokens = "?" if rows is None else _count(rows * d.T)
        basis = f"stop.num_epochs {s.num_epochs:g} x {train_tokens} train tokens"
        if rows is None:
            return None, "unknown", f"unknown ({why}): {basis}{_also(early)}"
        per_epoch_step = _batch_rows(cfg)[1] / rows
    steps = total_steps_for(cfg, d.batch_size * d.T, per_epoch_step)
    return steps, "upper bound" if early else "fixed", basis + _also(early)


def _also(early: list[str]) -> str:
    return f" (upper bound: also {', '.join(early)})" if early else ""


def train_rows(cfg: config_lib.Config) -> tuple[int | None, str]:
    """(train rows of data.path, '') from its sidecar, or (None, why not)."""
    path = Path(cfg.data.path)
    if not cfg.data.path or not path.exists():
        return None, "token file missing"
    try:
        _, meta = read_token_file(path)
    except TokenFileError:
        return None, "token file incomplete"
    rows = int(meta["num_tokens"]) // cfg.data.T - _eval_rows(cfg.data.valid_tokens, cfg.data.T)
    return (rows, "") if rows > 0 else (None, "token file smaller than its valid split")


def _batch_rows(cfg: config_lib.Config) -> tuple[int, int, int]:
    """A batch's rows as assemble.build_setup splits them: (replay rows replacing new rows,
    rows from data.path, rows from mix.path)."""
    d, r = cfg.data, cfg.reg
    replaced = math.floor(r.coeff * d.batch_size) if regularisers.get(r.method).coeff_is_fraction else 0
    mix = data_lib.mix_row_count(d.batch_size - replaced, cfg.mix.fraction)
    return replaced, d.batch_size - replaced - mix, mix


def _rates(cfg: config_lib.Config) -> tuple[float, float, float]:
    """(C, F, S): training, forward and sampling FLOPs per token (see the module docstring)."""
    C = model_lib.flops_per_token(cfg.model, cfg.data.T)
    return C, C / 3, C / 3 - 2.0 * cfg.model.L * cfg.data.T * cfg.model.D


def step_flops(cfg: config_lib.Config) -> tuple[float, float]:
    """(training FLOPs of one step, FLOPs of one refill of the self-generated buffer)."""
    m, d, r = cfg.model, cfg.data, cfg.reg
    method, (C, F, S) = regularisers.get(r.method), _rates(cfg)
    R = r.replay_batch_size or d.batch_size  # (config.validate: a regulariser implies a parent)
    step = d.batch_size * d.T * C + 3 * 2 * cfg.lora.rank * 12 * m.L * m.D**2  # LoRA: the merge
    if method.replay_rows and not method.coeff_is_fraction:
        step += R * d.T * (C + (F if method.frozen else 0.0))
    if method.name in TEACHER_ON_NEW_ROWS:
        step += d.batch_size * d.T * F
    sampled = _batch_rows(cfg)[0] if method.coeff_is_fraction else R
    return float(step), float(r.buffer * sampled * d.T * S if r.synth and method.replay_rows else 0)


def flops_per_train_token(cfg: config_lib.Config) -> float:
    """Training FLOPs per training token, sampling included, one-off work (the Fisher) not: the
    cost of a run at any length, known or not."""
    (step, refill), r = step_flops(cfg), cfg.reg
    return (step + refill / (r.buffer * r.reuse)) / (cfg.data.batch_size * cfg.data.T)


def train_flops(cfg: config_lib.Config, steps: int) -> float:
    """Training FLOPs of `steps` steps of a resolved config, the regulariser's work included."""
    d, r = cfg.data, cfg.reg
    (C, _, S), (step, refill) = _rates(cfg), step_flops(cfg)
    total = steps * step + math.ceil(steps / (r.buffer * r.reuse)) * refill  # whole buffers
    if regularisers.get(r.method).fisher:  # once: per-row gradients on fisher_batches x R rows
        total += r.fisher_batches * (r.replay_batch_size or d.batch_size) * d.T * (C + r.synth * S)
    return float(total)


def eval_flops(cfg: config_lib.Config, steps: int) -> float:
    """Evaluation FLOPs of a run of `steps` steps (see the module docstring)."""
    m, d, log = cfg.model, cfg.data, cfg.log
    F = model_lib.flops_per_token(m, d.T) / 3
    sets = {"valid": _eval_rows(d.valid_tokens, d.T) * d.T}
    if _batch_rows(cfg)[2] and cfg.mix.valid_tokens > 0:
        sets["mix"] = _eval_rows(cfg.mix.valid_tokens, d.T) * d.T
    if m.load_path and cfg.parent.T:
        sets["prev"] = _eval_rows(cfg.parent.valid_tokens, cfg.parent.T) * cfg.parent.T
    evals = 1 + math.ceil(steps / max(1, round(log.every_tokens / (d.batch_size * d.T))))
    total = evals * sum(sets.values()) * F
    if m.load_path and log.eval_kl:
        shapes = {k: (1, v // d.T, d.T) for k, v in sets.items() if v}
        forms = teacher_forms(shapes, m.D, m.V, log.teacher_cache_mb)
        total += sum(sets[k] * F * (evals if form == "params" else 1) for k, form in forms.items())
    return float(total)


def _eval_rows(valid_tokens: int, T: int) -> int:
    return math.ceil(valid_tokens / T) if valid_tokens > 0 else 0


def point_cost(cfg: config_lib.Config) -> PointCost:
    """The planned cost of one run; `cfg` resolved (a finetune's architecture from its parent:
    `with_parent`)."""
    steps, length, basis = planned_steps(cfg)
    n, per_token = model_lib.paper_param_count(cfg.model), flops_per_train_token(cfg)
    if steps is None:
        return PointCost(None, length, basis, None, None, n, per_token)
    tokens = steps * cfg.data.batch_size * cfg.data.T
    flops = (train_flops(cfg, steps), eval_flops(cfg, steps))
    return PointCost(tokens, length, basis, *flops, n, per_token)


def resolved_configs(points: Iterable[Point]) -> list[config_lib.Config]:
    """Each point's config with its parent's architecture: the parent point's config (the sweep
    has not run it yet), else a finished run folder at model.load_path; else as configured."""
    by_dir: dict[str, config_lib.Config] = {}
    out = []
    for p in points:
        cfg = p.config()
        link = cfg.model.load_path
        if link and hf.is_hf(link):  # a Hugging Face parent: its config.json where it is at hand
            cfg = _with_hf_parent(cfg)
        else:
            parent = (by_dir.get(str(Path(link))) or _stored_config(link)) if link else None
            cfg = with_parent(cfg, parent) if parent is not None else cfg
        by_dir[str(p.out_dir)] = cfg
        out.append(cfg)
    return out


def _with_hf_parent(cfg: config_lib.Config) -> config_lib.Config:
    """`cfg` resolved against its local Hugging Face folder; as configured when the folder is not
    here (a hub id not downloaded yet: the parameter file then states the architecture)."""
    if not Path(cfg.model.load_path.removeprefix(hf.PREFIX)).is_dir():
        return cfg
    return finetune.resolve(cfg)


def _stored_config(run_dir: str) -> config_lib.Config | None:
    try:
        return config_lib.from_dict(runs.read_config(run_dir))
    except (runs.RunFolderError, ConfigError):
        return None


def point_table(points: list[Point]) -> pd.DataFrame:
    """One row per point: stage, point, tokens, train_flops, eval_flops, length, basis."""
    rows = [
        {"stage": p.stage, "point": p.id, **{k: getattr(c, k) for k in POINT_COLUMNS[2:]}}
        for p, c in zip(points, map(point_cost, resolved_configs(points)))
    ]
    return pd.DataFrame(rows, columns=list(POINT_COLUMNS))


def cost_table(points: list[Point], *, mfu: float = MFU, peak_tflops: float = PEAK_TFLOPS) -> pd.DataFrame:
    """Per stage, then a `total` row: points, planned tokens, training and evaluation FLOPs,
    accelerator-hours at `mfu` of `peak_tflops`, and how the lengths were set (e.g. "8 upper
    bound"). Sums are over the points whose length is known (NaN where none is)."""
    if not (0 < mfu <= 1 and peak_tflops > 0):
        raise ConfigError(f"--mfu={mfu} must be in (0, 1] and --peak-tflops={peak_tflops} > 0")
    per_point = point_table(points)
    rows = [_summed(stage, group) for stage, group in per_point.groupby("stage", sort=False)]
    rows.append(_summed("total", per_point))
    table = pd.DataFrame(rows, columns=[c for c in TABLE_COLUMNS if c != "accel_hours"])
    flops = table["train_flops"].add(table["eval_flops"], fill_value=0)
    table.insert(5, "accel_hours", flops / (mfu * peak_tflops * 1e12) / 3600)
    return table


def _summed(stage: str, group: pd.DataFrame) -> dict[str, object]:
    kinds = Counter(b.split(":")[0] if k == "unknown" else k for k, b in zip(group["length"], group["basis"]))
    return {
        "stage": stage,
        "points": len(group),
        **{c: group[c].astype(float).sum(min_count=1) for c in ("tokens", "train_flops", "eval_flops")},
        "length": ", ".join(f"{n} {kind}" for kind, n in kinds.items()),
        "basis": group["basis"].iloc[0] if group["basis"].nunique() == 1 else "varies by point",
        "flops_per_token": (group["flops_per_token"].min(), group["flops_per_token"].max()),
    }


def format_table(table: pd.DataFrame, *, mfu: float = MFU, peak_tflops: float = PEAK_TFLOPS) -> str:
    """The cost table as text, headed by the assumption behind accelerator-hours."""
    shown = table.drop(columns=["basis", "flops_per_token"]).assign(
        tokens=table["tokens"].map(_count),
        train_flops=table["train_flops"].map(_sci),
        eval_flops=table["eval_flops"].map(_sci),
        accel_hours=table["accel_hours"].map(_hours),
    )
    peak = f"{peak_tflops:g} TFLOP/s peak{' (H100 SXM, dense bf16)' if peak_tflops == PEAK_TFLOPS else ''}"
    lines = [
        f"planned cost; accelerator-hours = (train + eval FLOPs) / (MFU {mfu:g} x {peak}); "
        f"'?' = not known before running; sums over the points whose length is known",
        shown.to_string(index=False),
        *(
            f"  {r.stage}: {_span(r.flops_per_token)} training FLOPs per token; length {r.basis}"
            for r in table.itertuples()
            if r.stage != "total"
        ),
    ]
    return "\n".join(lines)


def _span(bounds: tuple[float, float]) -> str:
    low, high = map(_sci, bounds)
    return low if low == high else f"{low}..{high}"


def _hours(h: float) -> str:
    return "?" if pd.isna(h) else f"{h:,.1f}" if h >= 1 else f"{h:.2g}"


def _count(x: float | None) -> str:
    if x is None or pd.isna(x):
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def _sci(x: float | None) -> str:
    return "?" if x is None or pd.isna(x) else f"{x:.3g}"
