"""One training loop for pretraining and finetuning: `train_and_evaluate(cfg, out_dir)`.

The loop alternates an *interval* of jitted train steps (params and optimizer state donated,
batches prepared on the host while the device works) with one evaluation (a jitted `lax.scan` over
the device-resident validation rows). Timing separates pure train-step time from evaluation and
compilation. Stop rules are checked after each step (lengths, time) or evaluation (target loss,
patience, non-finite loss). Everything a resumed run needs is in the checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import config as config_lib, runs, runtime, trackers as trackers_lib
from ..progress import Progress
from . import checkpoint, lora as lora_lib, model as model_lib, replay as replay_lib, sharding
from .assemble import KEY_LORA, Setup, build_setup, compile_all
from .evaluate import distance, identical, weight_norm
from .finetune import KEY_MODEL, resolve
from .multiple_choice import run_suite
from .step import lr_schedule

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class RunResult:
    """What a finished (or failed) run returns; the run folder holds the full record."""

    out_dir: Path
    status: str  # finished | failed
    stop_reason: str  # which rule ended the run (num_tokens_train, target_loss, ...)
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
    sample_time_s: float = 0.0
    sampled_rows: int = 0  # self-generated replay rows sampled (incl. the unused rest of a call)
    checkpoint_step: int = 0  # step of the last checkpoint (checkpoints follow the first
    # evaluation at least checkpoint_every steps after it)
    best_valid: float = math.inf
    evals_since_best: int = 0


def train_and_evaluate(
    cfg: config_lib.Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train per `cfg`, writing the run folder `out_dir`; see the module docstring.

    `on_eval(row)` is called with every metrics row as it is written (e.g. to update a live plot).

    In a multi-process run (engine/sharding.py) every process calls this with the same arguments;
    process 0 alone writes the folder, the others compute their share and read it.
    """
    runtime.configure()
    out_dir = Path(out_dir)
    cfg = resolve(cfg)  # a finetuning run reads its architecture and parent split from the parent
    if not sharding.is_main_process():
        return _follow(cfg, out_dir, on_eval)
    existed = out_dir.exists()
    with runs.lock(out_dir):  # one writer per run folder
        try:
            state = runs.prepare_run_dir(
                cfg.to_dict(),
                out_dir,
                resume=resume,
                overwrite=overwrite,
                defaults=config_lib.Config().to_dict(),
            )
        except Exception:
            if not existed:
                runs.discard_if_empty(out_dir)  # a refused run leaves no folder behind
            sharding.agree(_REFUSED)  # the other processes of a multi-process run stop too
            raise
        sharding.agree(_FINISHED if state == "finished" else _START)
        if state == "finished":
            return _finished(out_dir)
        try:
            runs.remove_stale_temporaries(out_dir)
            setup = _build(cfg)  # fails early (naming the file) on missing or unfit data
        except Exception:
            if not existed:
                runs.discard_if_empty(out_dir)  # a refused run leaves no folder behind
            raise
        if state == "new":
            runs.reset_run_files(out_dir)  # a refused or crashed start left at most a config
            runs.write_config(out_dir, cfg.to_dict())
        return _run(setup, out_dir, on_eval)


_START, _FINISHED, _REFUSED = 0, 1, 2  # what process 0 tells the others about the run folder


def _follow(
    cfg: config_lib.Config, out_dir: Path, on_eval: Callable[[dict[str, Any]], None] | None
) -> RunResult:
    """A process other than 0 of a multi-process run: learn from process 0 whether the run
    starts, then build the same setup and train in step with it, writing nothing."""
    status = sharding.agree(_START)
    if status == _REFUSED:
        raise runs.RunFolderError(f"process 0 refused the run folder {out_dir}; its error says why")
    if status == _FINISHED:
        return _finished(out_dir)
    return _run(_build(cfg), out_dir, on_eval)


def _build(cfg: config_lib.Config) -> Setup:
    """`build_setup`, plus the multiple-choice benchmarks of log.mc_evals (read and tokenised
    once, with the training data's tokenizer and dataset-id token), as setup.compiled["mc"]."""
    setup = build_setup(cfg)
    if cfg.log.mc_evals:
        rows = setup.batcher.main
        setup.compiled["mc"] = run_suite(
            cfg.log.mc_evals,
            cfg.log.mc_limit,
            rows.sidecar,
            rows.path,
            model_lib.make_hidden(setup.graphdef),
            cfg.data.T,
            setup.eval_sets["valid"][0].shape[1],  # the evaluation's batch rows
            setup.placement,
        )
    return setup


def _run(setup: Setup, out_dir: Path, on_eval: Callable[[dict[str, Any]], None] | None) -> RunResult:
    """Train from the folder's last checkpoint (or from the start) to a stop rule; write the summary."""
    params, opt_state, tracker = _initial_state(setup, out_dir)
    if sharding.agree(tracker.step) != tracker.step:
        raise checkpoint.CheckpointError(
            f"this process resumes {out_dir} at step {tracker.step}, process 0 at another step: "
            f"the run folder must be on a filesystem every process sees the same"
        )
    if not sharding.is_main_process():
        return _train(setup, out_dir, on_eval, params, opt_state, tracker)
    # optional mirrors of metrics.jsonl (log.wandb, log.tensorboard), closed however the run ends
    with trackers_lib.open_trackers(setup.cfg, out_dir, resumed_step=tracker.step) as mirrors:

        def observe(row: dict[str, Any]) -> None:
            mirrors.log(row)
            if on_eval is not None:
                on_eval(row)

        result = _train(setup, out_dir, observe, params, opt_state, tracker)
        mirrors.finish(runs.read_summary(out_dir))
    return result


def _train(
    setup: Setup,
    out_dir: Path,
    on_eval: Callable[[dict[str, Any]], None] | None,
    params: Any,
    opt_state: Any,
    tracker: Tracker,
) -> RunResult:
    cfg, main = setup.cfg, sharding.is_main_process()
    compile_s = compile_all(setup, params, opt_state)
    if "mc" in setup.compiled:  # the benchmarks' scorer, for the evaluated (materialised) params
        start = time.perf_counter()
        evaluated = jax.eval_shape(setup.compiled["materialize"], params, setup.ctx)
        setup.compiled["mc"].compile(setup.placement.abstract(evaluated))
        compile_s += time.perf_counter() - start
    wall_start = time.perf_counter()
    if tracker.step == 0:
        row = _evaluate(setup, params, tracker, {"train_ntp": None, "train_reg": None})
        _record(out_dir, row, on_eval)
        if setup.replay_rows:
            _keep_replay_rows(setup, tracker, out_dir)
    enabled = cfg.log.progress and main
    with Progress("train", total=_total_tokens(setup), unit="tok", enabled=enabled) as bar:
        bar.update(tracker.step * setup.tokens_per_step)
        params, opt_state, status, reason, failed_at = _loop(
            setup, params, opt_state, tracker, out_dir, bar, on_eval
        )
    wall_s = time.perf_counter() - wall_start
    if not main:
        sharding.sync("summary written")
        final = _last_finite(runs.read_metrics(out_dir))
        return RunResult(out_dir, status, reason, tracker.step, tracker.step * setup.tokens_per_step, final)
    summary = _summary(setup, tracker, status, reason, compile_s, wall_s, out_dir, failed_at)
    runs.write_summary(out_dir, summary)
    sharding.sync("summary written")
    return RunResult(
        out_dir, status, reason, tracker.step, tracker.step * setup.tokens_per_step, summary["final"]
    )


def _record(out_dir: Path, row: dict[str, Any], on_eval: Callable[[dict[str, Any]], None] | None) -> None:
    """Append a metrics row (process 0 only) and pass it to `on_eval`."""
    if sharding.is_main_process():
        runs.append_metrics(out_dir, row)
    if on_eval is not None:
        on_eval(row)


def _total_tokens(setup: Setup) -> int | None:
    return None if setup.total_steps is None else setup.total_steps * setup.tokens_per_step


def _loop(
    setup: Setup,
    params: Any,
    opt_state: Any,
    tracker: Tracker,
    out_dir: Path,
    bar: Progress,
    on_eval: Callable[[dict[str, Any]], None] | None,
) -> tuple[Any, Any, str, str, int | None]:
    """Train/evaluate intervals until a stop rule fires; returns the final state, the status, why
    it ended and (failed runs) the first step whose loss was not finite."""
    if setup.total_steps is not None and tracker.step >= setup.total_steps:
        # resumed from the final checkpoint (killed before the summary): nothing left to train
        last = runs.read_metrics(out_dir)[-1]
        return params, opt_state, "finished", _stop_reason(setup, tracker, last), None
    while True:
        target = tracker.step + setup.eval_every - tracker.step % setup.eval_every
        if setup.total_steps is not None:
            target = min(target, setup.total_steps)
        params, opt_state, stats = _train_interval(setup, params, opt_state, tracker, target, bar)
        finite = np.isfinite(stats["ntp"]) & np.isfinite(stats["reg"])
        if not finite.all():
            first_bad = tracker.step - len(finite) + int(np.argmin(finite)) + 1
            return params, opt_state, "failed", f"non_finite_loss at step {first_bad}", first_bad
        row = _evaluate(
            setup,
            params,
            tracker,
            {"train_ntp": float(stats["ntp"].mean()), "train_reg": float(stats["reg"].mean())},
        )
        _record(out_dir, row, on_eval)
        bar.update(0, loss=row["valid_ntp"])
        reason = _stop_reason(setup, tracker, row)
        if reason is None and not math.isfinite(row["valid_ntp"]):
            return params, opt_state, "failed", f"non_finite_valid_loss at step {tracker.step}", tracker.step
        due = (
            setup.checkpoint_every is not None
            and tracker.step - tracker.checkpoint_step >= setup.checkpoint_every
        )
        if reason is not None or due:
            tracker.checkpoint_step = tracker.step
            _save(setup, params, opt_state, tracker, out_dir)
        if reason is not None:
            return params, opt_state, "finished", reason, None


def _train_interval(
    setup: Setup, trainable: Any, opt_state: Any, tracker: Tracker, target: int, bar: Progress
) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """Steps tracker.step+1 .. target (fewer if the train-time budget runs out).

    Returns per-step {"ntp": [steps], "reg": [steps]}. Train time includes preparing batches and
    sampling self-generated replay rows (also counted apart as sample_time_s).
    """
    step_fn, place = setup.compiled["step"], setup.placement
    batch_shape = (setup.batcher.batch_size, setup.cfg.data.T)
    budget = setup.cfg.stop.train_time_s
    no_replay = _rows(setup, np.zeros((0, setup.cfg.data.T), np.int32))
    sampled_before = (setup.replay.sample_time_s, setup.replay.sampled_rows) if setup.replay else (0.0, 0)
    stats = []
    start = time.perf_counter()
    while tracker.step < target:
        # on a mesh, each process reads only the rows its devices hold
        batch = place.rows(partial(setup.batcher.batch, tracker.step), batch_shape)
        if setup.replay_rows and stats and not setup.replay.ready(tracker.step):
            jax.block_until_ready(stats[-1])  # sampling time excludes the steps still in flight
        replay = _rows(setup, setup.replay.batch(tracker.step)) if setup.replay_rows else no_replay
        trainable, opt_state, out = step_fn(trainable, opt_state, setup.ctx, batch, replay)
        stats.append(out)
        tracker.step += 1
        bar.update(setup.tokens_per_step)
        if budget is not None:
            out["ntp"].block_until_ready()
            # process 0's clock decides for every process (they must run the same steps)
            if sharding.agree(tracker.train_time_s + time.perf_counter() - start >= budget):
                break
    values = jax.device_get(stats)  # waits for the last step
    tracker.train_time_s += time.perf_counter() - start
    if setup.replay:
        tracker.sample_time_s += setup.replay.sample_time_s - sampled_before[0]
        tracker.sampled_rows += setup.replay.sampled_rows - sampled_before[1]
    return trainable, opt_state, {k: np.array([v[k] for v in values], np.float64) for k in ("ntp", "reg")}


def _rows(setup: Setup, rows: Any) -> Any:
    """Rows [n, T] (host or device) as the step takes them: as they are on one device, split
    over the batch axes on a mesh."""
    if setup.placement.mesh is None:
        return rows
    if isinstance(rows, np.ndarray):
        return setup.placement.rows(lambda a, b: rows[a:b], rows.shape)
    return setup.placement.reshard_rows(rows)


KEPT_REPLAY_ROWS = 256  # replay rows of a run's first steps kept for engine/diagnostics.py


def kept_replay_steps(rows_per_step: int, window: int, available: int | None) -> list[int]:
    """The steps whose replay rows a run keeps: about KEPT_REPLAY_ROWS rows, from steps spread
    evenly over the first `window` steps (at least the steps those rows fill; one chunk's span
    for self-generated replay, so that reused rows show), never past `available` (the run's
    length, and the steps the first sampler call provides; None: unbounded)."""
    count = math.ceil(KEPT_REPLAY_ROWS / rows_per_step)
    window = max(window, count)
    if available is not None:
        count, window = min(count, available), min(window, available)
    return sorted({round(i * (window - 1) / max(count - 1, 1)) for i in range(count)})


def _keep_replay_rows(setup: Setup, tracker: Tracker, out_dir: Path) -> None:
    """Write the replay rows of `kept_replay_steps` to the run folder (rows a run that stops
    early, at its target loss, may not reach). Sampling them is the first steps' own sampling,
    so its time counts as training and sampling time."""
    replay, limits = setup.replay, [setup.total_steps]
    window = 0
    if isinstance(replay, replay_lib.SelfGeneratedReplay):
        window = replay.span
        limits.append(replay.sampled_steps())
    available = min((x for x in limits if x is not None), default=None)
    start, sampled = time.perf_counter(), (replay.sample_time_s, replay.sampled_rows)
    steps = kept_replay_steps(setup.replay_rows, window, available)
    rows = np.concatenate([sharding.to_host(replay.batch(step)) for step in steps])  # [n, T]
    tracker.train_time_s += time.perf_counter() - start
    tracker.sample_time_s += replay.sample_time_s - sampled[0]
    tracker.sampled_rows += replay.sampled_rows - sampled[1]
    if sharding.is_main_process():
        runs.write_replay_rows(out_dir, rows)


def _evaluate(setup: Setup, trainable: Any, tracker: Tracker, extra: dict[str, Any]) -> dict[str, Any]:
    """One metrics row: every eval set's losses (and KL to the parent), weight norm and drift,
    forgetting so far, timings, learning rate."""
    start = time.perf_counter()
    row: dict[str, Any] = {
        "step": tracker.step,
        "tokens": tracker.step * setup.tokens_per_step,
        "epoch": setup.batcher.epochs(tracker.step),
    }
    params = setup.compiled["materialize"](trainable, setup.ctx)
    for name in setup.eval_sets:
        row.update({f"{name}_{k}": float(v) for k, v in _eval_set(setup, params, name).items()})
    if "mc" in setup.compiled:  # log.mc_evals: mc_<name> accuracies, their mean, chance levels
        row.update(setup.compiled["mc"](params))
    row["weight_norm"] = float(weight_norm(params))
    if setup.parent is not None:
        row["drift"] = float(distance(params, setup.parent.params)) / setup.parent.init_distance
        if setup.cfg.parent.final_valid_ntp is not None and "prev_ntp" in row:
            row["forgetting"] = row["prev_ntp"] - setup.cfg.parent.final_valid_ntp
    tracker.eval_time_s += time.perf_counter() - start
    lr = lr_schedule(
        setup.cfg.opt, math.ceil(setup.cfg.opt.warmup_tokens / setup.tokens_per_step), setup.total_steps
    )(max(tracker.step - 1, 0))
    row.update(
        extra,
        lr=float(lr),
        train_time_s=tracker.train_time_s,
        eval_time_s=tracker.eval_time_s,
        sample_time_s=tracker.sample_time_s,
    )
    row["tokens_per_s"] = row["tokens"] / tracker.train_time_s if tracker.train_time_s else None
    return row


def _eval_set(setup: Setup, params: Any, name: str) -> dict[str, Any]:
    """Metrics of one eval set. The first evaluation of a finetune also caches the parent's side
    of the KL (setup.teacher_forms); while the model still *is* the parent (the first evaluation
    of a fresh run), that parent pass is the evaluation, and the KL is exactly 0."""
    tokens, mask = setup.eval_sets[name]
    form = setup.teacher_forms.get(name)
    if form in ("probs", "hidden") and name not in setup.teacher_cache:
        own, setup.teacher_cache[name] = setup.compiled[f"teacher_{name}"](setup.ctx["frozen"], tokens, mask)
        if bool(identical(params, setup.ctx["frozen"])):
            return {**jax.device_get(own), "kl": 0.0}
    teacher_in = setup.ctx["frozen"] if form == "params" else setup.teacher_cache.get(name)
    return jax.device_get(setup.compiled[f"eval_{name}"](params, teacher_in, tokens, mask))


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
    if s.train_time_s is not None and sharding.agree(tracker.train_time_s >= s.train_time_s):
        return "train_time_s"
    if s.patience is not None and tracker.evals_since_best >= s.patience:
        return "patience"
    return None


def _initial_state(setup: Setup, out_dir: Path) -> tuple[Any, Any, Tracker]:
    """(trainable, optimizer state, tracker): fresh, or from the run's last complete checkpoint.

    The trainable tree is the full parameters (initialised, or copied from the parent), or the
    LoRA adapters of a LoRA run. Finetuning starts a fresh optimizer and warm-up.
    """
    root, place, main = jax.random.key(setup.cfg.run.seed), setup.placement, sharding.is_main_process()
    if setup.parent is None:
        _, params = model_lib.init_model(setup.cfg.model, key=jax.random.fold_in(root, KEY_MODEL))
        params = place.put(params)  # split over the mesh, if any
    else:
        params = jax.tree.map(jnp.copy, setup.parent.params)  # the parent stays intact: donation
    trainable = (
        place.put(lora_lib.init_adapters(params, setup.cfg.lora.rank, key=jax.random.fold_in(root, KEY_LORA)))
        if setup.lora
        else params
    )
    if place.mesh is None:
        opt_state = setup.optimizer.init(trainable)
    else:  # the moments sharded as the weights are
        shapes = jax.eval_shape(setup.optimizer.init, trainable)
        opt_state = jax.jit(setup.optimizer.init, out_shardings=place.tree(shapes))(trainable)
    if checkpoint.latest(out_dir / runs.CHECKPOINT) is None:
        if main:
            runs.truncate_metrics(out_dir, -1)
        return trainable, opt_state, Tracker()
    template = {"params": params, "opt_state": opt_state, **({"lora": trainable} if setup.lora else {})}
    stored, meta = checkpoint.load(out_dir / runs.CHECKPOINT, template)
    tracker = Tracker(**meta["tracker"])
    sharding.sync("checkpoint read")  # process 0 may now cut the metrics the checkpoint lacks
    if main:
        runs.truncate_metrics(out_dir, tracker.step)
    trainable = stored["lora"] if setup.lora else stored["params"]
    return place.put(trainable), place.put(stored["opt_state"]), tracker


def _save(setup: Setup, trainable: Any, opt_state: Any, tracker: Tracker, out_dir: Path) -> None:
    """Checkpoint: full params (merged for LoRA, so any run can be a parent), optimizer state,
    the adapters of a LoRA run, and the tracker (step = data position, timings, best loss)."""
    meta = {
        "tracker": vars(tracker),
        "seed": setup.cfg.run.seed,
        "split_seed": setup.cfg.data.split_seed,
        "data_position": {"step": tracker.step, "rows_consumed": tracker.step * setup.batcher.batch_size},
    }
    tree = {"params": setup.compiled["materialize"](trainable, setup.ctx), "opt_state": opt_state}
    if setup.lora:
        tree["lora"] = trainable
    tree = sharding.to_host(tree)  # gathered from every device (and host) to process 0
    if sharding.is_main_process():
        checkpoint.save(out_dir / runs.CHECKPOINT, tree, meta)
    sharding.sync("checkpoint written")


def _summary(
    setup: Setup,
    tracker: Tracker,
    status: str,
    reason: str,
    compile_s: float,
    wall_s: float,
    out_dir: Path,
    failed_at: int | None = None,
) -> dict[str, Any]:
    rows = runs.read_metrics(out_dir)
    paper_n = model_lib.paper_param_count(setup.cfg.model)
    tokens = tracker.step * setup.tokens_per_step
    return {
        "status": status,
        "stop_reason": reason,
        "step": tracker.step,
        "tokens": tokens,
        "num_params": setup.num_params,
        "paper_num_params": paper_n,
        "tokens_per_param": tokens / paper_n,
        "train_time_s": tracker.train_time_s,
        "eval_time_s": tracker.eval_time_s,
        "sample_time_s": tracker.sample_time_s,
        "sampled_rows": tracker.sampled_rows,
        "compile_time_s": compile_s,
        "wall_time_s_this_session": wall_s,
        "tokens_per_s": tokens / tracker.train_time_s if tracker.train_time_s else None,
        "dataset_token": setup.batcher.main.dataset_token,
        "tokenizer_fingerprint": setup.batcher.main.sidecar.get("tokenizer_fingerprint", ""),
        "best_valid_ntp": tracker.best_valid if math.isfinite(tracker.best_valid) else None,
        "final": _last_finite(rows),  # a failed run's last finite evaluation
        **({"failed_at_step": failed_at} if failed_at is not None else {}),
        "checkpoint": runs.CHECKPOINT,  # relative to the run folder
    }


def _finished(out_dir: Path) -> RunResult:
    """A finished run being resumed, returned as it is."""
    summary = runs.read_summary(out_dir)
    return RunResult(
        out_dir, "finished", summary["stop_reason"], summary["step"], summary["tokens"], summary["final"]
    )


def _last_finite(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last metrics row whose losses are all finite ({} if none is)."""
    for row in reversed(rows):
        if all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
            return row
    return {}
