"""One training loop for pretraining (and, later, finetuning): `train_and_evaluate(cfg, out_dir)`.

The loop alternates an *interval* of jitted train steps (params and optimizer state donated,
batches prepared on the host while the device works) with one evaluation (a jitted `lax.scan` over
the device-resident validation rows). Timing separates pure train-step time from evaluation and
compilation. Stop rules are checked after each step (lengths, time) or evaluation (target loss,
patience, non-finite loss). Everything a resumed run needs is in the checkpoint.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from . import checkpoint, config as config_lib, data as data_lib, model as model_lib, runs, runtime
from .evaluate import make_evaluator, weight_norm
from .losses import ntp_from_hidden
from .progress import Progress

# Named streams of the run's root key (see STYLE: one root key, split by name).
KEY_MODEL = 0


@dataclass(frozen=True)
class RunResult:
    """What a finished (or failed) run returns; the run folder holds the full record."""

    out_dir: Path
    status: str          # finished | failed
    stop_reason: str     # which rule ended the run (num_tokens_train, target_loss, ...)
    step: int
    tokens: int
    final: dict[str, Any]  # the last metrics row

    def metrics(self) -> pd.DataFrame:
        return runs.load_runs(self.out_dir)


@dataclass
class Tracker:
    """Mutable progress of a run; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    best_valid: float = math.inf
    evals_since_best: int = 0


@dataclass
class Setup:
    """Everything static about a run, built once before the loop."""

    cfg: config_lib.Config
    graphdef: Any
    optimizer: optax.GradientTransformation
    batcher: data_lib.Batcher
    eval_sets: dict[str, tuple[jax.Array, jax.Array]]  # name -> ([nb, Be, T] tokens, [nb, Be] mask)
    tokens_per_step: int
    total_steps: int | None
    eval_every: int            # steps between evaluations
    checkpoint_every: int | None  # steps between checkpoints (None: only at the end)
    num_params: int
    compiled: dict[str, Callable] = field(default_factory=dict)


def lr_schedule(opt: config_lib.OptConfig, warmup_steps: int, total_steps: int | None
                ) -> optax.Schedule:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to 0 at `total_steps`."""
    def schedule(count: jax.Array) -> jax.Array:
        lr = opt.lr * jnp.minimum(1.0, (count + 1) / max(warmup_steps, 1))
        if opt.schedule == "cosine":
            span = max((total_steps or 1) - warmup_steps, 1)
            progress = jnp.clip((count - warmup_steps) / span, 0.0, 1.0)
            lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return lr
    return schedule


def make_optimizer(opt: config_lib.OptConfig, warmup_steps: int, total_steps: int | None
                   ) -> optax.GradientTransformation:
    """AdamW with the run's schedule; no gradient clipping (as in the paper)."""
    return optax.adamw(lr_schedule(opt, warmup_steps, total_steps), b1=opt.b1, b2=opt.b2,
                       eps=opt.eps, weight_decay=opt.weight_decay)


def make_train_step(hidden: Callable, optimizer: optax.GradientTransformation,
                    microbatches: int = 1) -> Callable:
    """(params, opt_state, batch [B, T]) -> (params, opt_state, loss); jit with donation.

    `hidden` is `model.make_hidden(graphdef)`: the loss fuses the unembedding
    (losses.ntp_from_hidden). With `microbatches` > 1 the gradient is accumulated over that many
    equal slices of the batch in a `lax.scan` (same result up to float summation order; on a CPU,
    slices of ~512 tokens keep activations in cache and measured ~1.5x faster).
    """
    def loss_fn(params, batch):
        return jnp.mean(ntp_from_hidden(*hidden(params, batch), batch))

    def grads_fn(params, batch):
        if microbatches == 1:
            return jax.value_and_grad(loss_fn)(params, batch)
        B, T = batch.shape
        slices = batch.reshape(microbatches, B // microbatches, T)  # [M, B/M, T]

        def body(acc, micro):
            return jax.tree.map(jnp.add, acc, jax.value_and_grad(loss_fn)(params, micro)), None

        zero = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), params))
        total, _ = jax.lax.scan(body, zero, slices)
        return jax.tree.map(lambda x: x / microbatches, total)

    def train_step(params, opt_state, batch):
        loss, grads = grads_fn(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return jax.jit(train_step, donate_argnums=(0, 1))


def auto_microbatches(batch_size: int, T: int, rows: int = 0) -> int:
    """Number of gradient-accumulation slices: `batch_size / rows` if rows is set, else on a CPU
    the largest divisor of the batch with >= 512 tokens per slice, and 1 on accelerators."""
    if rows:
        return batch_size // rows
    if jax.default_backend() != "cpu":
        return 1
    per_slice = max(1, math.ceil(512 / T))
    while batch_size % per_slice:
        per_slice += 1
    return batch_size // per_slice


def auto_eval_rows(T: int) -> int:
    """Evaluation rows per scan step: ~1K tokens on a CPU (cache-resident; measured fastest for
    the tutorial model, 20% faster than 16K tokens), 64K tokens on accelerators."""
    return max(1, (1024 if jax.default_backend() == "cpu" else 65536) // T)


def total_steps_for(cfg: config_lib.Config, tokens_per_step: int, rows_per_epoch_step: float
                    ) -> int | None:
    """Training length in steps from whichever length rule is set (None: run until another rule)."""
    s = cfg.stop
    if s.num_tokens_train is not None:
        return max(1, math.ceil(s.num_tokens_train / tokens_per_step))
    if s.tokens_per_param is not None:
        n = model_lib.paper_param_count(cfg.model)
        return max(1, math.ceil(s.tokens_per_param * n / tokens_per_step))
    if s.num_epochs is not None:
        return max(1, math.ceil(s.num_epochs / rows_per_epoch_step))
    return None


def build_setup(cfg: config_lib.Config) -> Setup:
    """Open the data, size the run, and build (not yet compile) the model and optimizer."""
    d, m = cfg.data, cfg.model
    mix_rows = data_lib.mix_row_count(d.batch_size, cfg.mix.fraction)
    main = data_lib.open_rows(d.path, T=d.T, valid_tokens=d.valid_tokens, split_seed=d.split_seed,
                              vocab_size=m.V, min_train_rows=d.batch_size - mix_rows)
    eval_rows = d.eval_batch_size or auto_eval_rows(d.T)
    eval_sets = {"valid": data_lib.eval_batches(main, eval_rows)}
    mix = None
    if mix_rows:
        mix = data_lib.open_rows(cfg.mix.path, T=d.T, valid_tokens=cfg.mix.valid_tokens,
                                 split_seed=d.split_seed, vocab_size=m.V, min_train_rows=mix_rows)
        if cfg.mix.valid_tokens > 0:
            eval_sets["mix"] = data_lib.eval_batches(mix, eval_rows)
    batcher = data_lib.Batcher(main, d.batch_size, cfg.run.seed, mix, mix_rows)
    tokens_per_step = d.batch_size * d.T
    total = total_steps_for(cfg, tokens_per_step, (d.batch_size - mix_rows) / len(main.train_rows))
    warmup_steps = math.ceil(cfg.opt.warmup_tokens / tokens_per_step)
    graphdef, _ = model_lib.abstract_params(m)
    every = max(1, round(cfg.log.every_tokens / tokens_per_step))
    ckpt = cfg.log.checkpoint_every_tokens
    return Setup(cfg=cfg, graphdef=graphdef,
                 optimizer=make_optimizer(cfg.opt, warmup_steps, total), batcher=batcher,
                 eval_sets={k: (jnp.asarray(t), jnp.asarray(msk)) for k, (t, msk) in eval_sets.items()},
                 tokens_per_step=tokens_per_step, total_steps=total, eval_every=every,
                 checkpoint_every=None if ckpt is None else max(1, round(ckpt / tokens_per_step)),
                 num_params=model_lib.param_formula(m))


def compile_all(setup: Setup, params: Any, opt_state: Any) -> float:
    """Ahead-of-time compile the train step and evaluator; returns compile seconds."""
    start = time.perf_counter()
    hidden = model_lib.make_hidden(setup.graphdef)
    d = setup.cfg.data
    batch = jax.ShapeDtypeStruct((d.batch_size, d.T), jnp.int32)
    micro = auto_microbatches(d.batch_size, d.T, d.microbatch_rows)
    setup.compiled["step"] = make_train_step(hidden, setup.optimizer, micro).lower(
        params, opt_state, batch).compile()
    evaluator = make_evaluator(hidden)
    for name, (tokens, mask) in setup.eval_sets.items():
        setup.compiled[f"eval_{name}"] = evaluator.lower(params, tokens, mask).compile()
    return time.perf_counter() - start


def train_and_evaluate(cfg: config_lib.Config, out_dir: str | Path, *, resume: bool = False,
                       overwrite: bool = False) -> RunResult:
    """Train per `cfg`, writing the run folder `out_dir`; see the module docstring."""
    runtime.configure()
    out_dir = Path(out_dir)
    done = _prepare_run_dir(cfg, out_dir, resume=resume, overwrite=overwrite)
    if done is not None:
        return done
    setup = build_setup(cfg)
    params, opt_state, tracker = _initial_state(setup, out_dir)
    compile_s = compile_all(setup, params, opt_state)
    wall_start = time.perf_counter()
    if tracker.step == 0:
        row = _evaluate(setup, params, tracker, {"train_ntp": None})
        runs.append_metrics(out_dir, row)
    with Progress("train", total=_total_tokens(setup), unit="tok",
                  interactive=None if cfg.log.progress else False) as bar:
        bar.update(tracker.step * setup.tokens_per_step)
        params, opt_state, status, reason = _loop(setup, params, opt_state, tracker, out_dir, bar)
    summary = _summary(setup, tracker, status, reason, compile_s, time.perf_counter() - wall_start,
                       out_dir)
    runs.write_summary(out_dir, summary)
    return RunResult(out_dir, status, reason, tracker.step, tracker.step * setup.tokens_per_step,
                     summary["final"])


def _total_tokens(setup: Setup) -> int | None:
    return None if setup.total_steps is None else setup.total_steps * setup.tokens_per_step


def _loop(setup: Setup, params: Any, opt_state: Any, tracker: Tracker, out_dir: Path,
          bar: Progress) -> tuple[Any, Any, str, str]:
    """Train/evaluate intervals until a stop rule fires; returns the final state and why it ended."""
    while True:
        target = tracker.step + setup.eval_every - tracker.step % setup.eval_every
        if setup.total_steps is not None:
            target = min(target, setup.total_steps)
        params, opt_state, losses = _train_interval(setup, params, opt_state, tracker, target, bar)
        finite = np.isfinite(losses)
        if not finite.all():
            first_bad = tracker.step - len(losses) + int(np.argmin(finite)) + 1
            return params, opt_state, "failed", f"non_finite_loss at step {first_bad}"
        row = _evaluate(setup, params, tracker, {"train_ntp": float(losses.mean())})
        runs.append_metrics(out_dir, row)
        bar.update(0, loss=row["valid_ntp"])
        reason = _stop_reason(setup, tracker, row)
        if reason is None and not math.isfinite(row["valid_ntp"]):
            return params, opt_state, "failed", "non_finite_valid_loss"
        due = setup.checkpoint_every is not None and tracker.step % setup.checkpoint_every == 0
        if reason is not None or due:
            _save(setup, params, opt_state, tracker, out_dir)
        if reason is not None:
            return params, opt_state, "finished", reason


def _train_interval(setup: Setup, params: Any, opt_state: Any, tracker: Tracker, target: int,
                    bar: Progress) -> tuple[Any, Any, np.ndarray]:
    """Steps tracker.step+1 .. target (fewer if the train-time budget runs out); losses [steps]."""
    step_fn = setup.compiled["step"]
    budget = setup.cfg.stop.train_time_s
    losses = []
    start = time.perf_counter()
    while tracker.step < target:
        batch = setup.batcher.batch(tracker.step)
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(loss)
        tracker.step += 1
        bar.update(setup.tokens_per_step)
        if budget is not None:
            loss.block_until_ready()
            if tracker.train_time_s + time.perf_counter() - start >= budget:
                break
    values = np.asarray(jax.device_get(losses), dtype=np.float64)  # waits for the last step
    tracker.train_time_s += time.perf_counter() - start
    return params, opt_state, values


def _evaluate(setup: Setup, params: Any, tracker: Tracker, extra: dict[str, Any]) -> dict[str, Any]:
    """One metrics row: every eval set's losses, weight norm, timings, learning rate."""
    start = time.perf_counter()
    row: dict[str, Any] = {"step": tracker.step, "tokens": tracker.step * setup.tokens_per_step,
                           "epoch": setup.batcher.epochs(tracker.step)}
    for name, (tokens, mask) in setup.eval_sets.items():
        out = jax.device_get(setup.compiled[f"eval_{name}"](params, tokens, mask))
        row.update({f"{name}_{k}": float(v) for k, v in out.items()})
    row["weight_norm"] = float(weight_norm(params))
    tracker.eval_time_s += time.perf_counter() - start
    lr = lr_schedule(setup.cfg.opt, math.ceil(setup.cfg.opt.warmup_tokens / setup.tokens_per_step),
                     setup.total_steps)(max(tracker.step - 1, 0))
    row.update(extra, lr=float(lr), train_time_s=tracker.train_time_s,
               eval_time_s=tracker.eval_time_s)
    row["tokens_per_s"] = row["tokens"] / tracker.train_time_s if tracker.train_time_s else None
    return row


def _stop_reason(setup: Setup, tracker: Tracker, row: dict[str, Any]) -> str | None:
    s = setup.cfg.stop
    loss = row["valid_ntp"]
    if loss < tracker.best_valid:
        tracker.best_valid, tracker.evals_since_best = loss, 0
    else:
        tracker.evals_since_best += 1
    if setup.total_steps is not None and tracker.step >= setup.total_steps:
        return next(r for r in config_lib.LENGTH_RULES if getattr(s, r) is not None)
    if s.target_loss is not None and loss <= s.target_loss:
        return "target_loss"
    if s.train_time_s is not None and tracker.train_time_s >= s.train_time_s:
        return "train_time_s"
    if s.patience is not None and tracker.evals_since_best >= s.patience:
        return "patience"
    return None


def _initial_state(setup: Setup, out_dir: Path) -> tuple[Any, Any, Tracker]:
    """Fresh parameters, or the state of the run's last complete checkpoint."""
    root = jax.random.key(setup.cfg.run.seed)
    _, params = model_lib.init_model(setup.cfg.model, key=jax.random.fold_in(root, KEY_MODEL))
    opt_state = setup.optimizer.init(params)
    if checkpoint.latest(out_dir / runs.CHECKPOINT) is None:
        runs.truncate_metrics(out_dir, -1)
        return params, opt_state, Tracker()
    (params, opt_state), meta = checkpoint.load(out_dir / runs.CHECKPOINT, (params, opt_state))
    tracker = Tracker(**meta["tracker"])
    runs.truncate_metrics(out_dir, tracker.step)
    return jax.device_put(params), jax.device_put(opt_state), tracker


def _save(setup: Setup, params: Any, opt_state: Any, tracker: Tracker, out_dir: Path) -> None:
    meta = {"tracker": vars(tracker), "seed": setup.cfg.run.seed,
            "split_seed": setup.cfg.data.split_seed,
            "data_position": {"step": tracker.step,
                              "rows_consumed": tracker.step * setup.batcher.batch_size}}
    checkpoint.save(out_dir / runs.CHECKPOINT, (params, opt_state), meta)


def _summary(setup: Setup, tracker: Tracker, status: str, reason: str, compile_s: float,
             wall_s: float, out_dir: Path) -> dict[str, Any]:
    rows = runs.read_metrics(out_dir)
    paper_n = model_lib.paper_param_count(setup.cfg.model)
    tokens = tracker.step * setup.tokens_per_step
    return {"status": status, "stop_reason": reason, "step": tracker.step, "tokens": tokens,
            "num_params": setup.num_params, "paper_num_params": paper_n,
            "tokens_per_param": tokens / paper_n, "train_time_s": tracker.train_time_s,
            "eval_time_s": tracker.eval_time_s, "compile_time_s": compile_s,
            "wall_time_s_this_session": wall_s,
            "tokens_per_s": tokens / tracker.train_time_s if tracker.train_time_s else None,
            "best_valid_ntp": tracker.best_valid if math.isfinite(tracker.best_valid) else None,
            "final": rows[-1] if rows else {},
            "checkpoint": str(out_dir / runs.CHECKPOINT)}


def _prepare_run_dir(cfg: config_lib.Config, out_dir: Path, *, resume: bool, overwrite: bool
                     ) -> RunResult | None:
    """Create the run folder, or check that resuming it is safe; a finished run is returned as is."""
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    if (out_dir / runs.CONFIG).exists():
        if not resume:
            state = "a finished" if runs.is_finished(out_dir) else "an unfinished"
            raise runs.RunFolderError(f"{out_dir} already holds {state} run; pass resume=True "
                                      f"(CLI --resume) to continue it or overwrite=True (--overwrite) "
                                      f"to start again")
        _check_same_config(cfg, out_dir)
        summary = runs.read_summary(out_dir)
        if summary is not None and summary.get("status") == "finished":
            return RunResult(out_dir, "finished", summary["stop_reason"], summary["step"],
                             summary["tokens"], summary["final"])
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out_dir / runs.CONFIG)
    return None


def _check_same_config(cfg: config_lib.Config, out_dir: Path) -> None:
    flat_new: dict[str, Any] = {}
    flat_old: dict[str, Any] = {}
    runs._flatten("", cfg.to_dict(), flat_new)
    runs._flatten("", runs.read_config(out_dir), flat_old)
    differ = sorted(k for k in flat_new.keys() | flat_old.keys()
                    if k != "log.progress" and flat_new.get(k) != flat_old.get(k))
    if differ:
        raise runs.RunFolderError(f"{out_dir} was started with a different config ({', '.join(differ)}"
                                  f" differ); resume with the same config or use another out_dir")
