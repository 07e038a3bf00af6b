"""Sequential training over a list of toy tasks, with or without self-generated replay.

`train_sequence(cfg, out_dir) -> ToyResult` trains one model on `cfg.tasks` in order,
`steps_per_task` steps each, on fresh random problems every step. With `reg.method=ntp_pre` the
model is frozen as pi at each task boundary, and every later step adds `reg.coeff` x the
next-token loss on `replay_batch_size` rows sampled from pi (temperature `reg.temperature`, never
stopped early) prompted by the BOS tokens of the tasks already learned, in turn. Rows are sampled
`reg.buffer` steps at a time and each is used once. The step is the library's `make_train_step`
on `make_objective`, so the toy run uses exactly the finetuning code path.

Every `eval_every_steps` steps, and at the end of every task, each task's exact-match accuracy
under greedy KV-cache decoding is appended to `metrics.jsonl` (columns `acc_<task>`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from . import config as config_lib, model as model_lib, runs, runtime, toy
from .config import ModelConfig, OptConfig, RegConfig
from .progress import Progress
from .sampling import make_sampler
from .step import auto_microbatches, make_objective, make_optimizer, make_train_step

KEY_MODEL, KEY_DATA, KEY_REPLAY = 0, 1, 2  # named streams of the run's root key


@dataclass(frozen=True)
class ToyConfig:
    name: str = "toy"               # run folder name under out_dir
    seed: int = 0                   # root of the init, training-problem and replay keys
    eval_seed: int = 1234           # seed of the fixed evaluation problems (independent of seed)
    tasks: tuple[str, ...] = toy.PAPER_TASKS  # trained in this order
    steps_per_task: int = 1000      # optimizer steps on each task
    batch_size: int = 256           # new-task rows per step
    eval_every_steps: int = 100     # evaluate every task this often (and at each task's end)
    eval_problems: int = 512        # fixed evaluation problems per task
    model: ModelConfig = field(default_factory=lambda: ModelConfig(D=128, L=2, H=16, V=toy.V, dtype="float32"))
    opt: OptConfig = field(default_factory=lambda: OptConfig(lr=1e-3, b2=0.99, warmup_tokens=0, weight_decay=0.0))
    reg: RegConfig = field(default_factory=lambda: RegConfig(method="none", coeff=10.0, synth=True))
    progress: bool = True           # progress bar / periodic progress lines

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = list(self.tasks)
        return out


def load_config(raw: Mapping[str, Any] | None = None, **overrides: Any) -> ToyConfig:
    """A validated ToyConfig from a nested mapping (as in params/*/toy_continual.yaml); unknown
    keys are rejected with the nearest valid name. `overrides` replace top-level sections/keys."""
    raw = {**(raw or {}), **overrides}
    tasks = tuple(raw.pop("tasks", toy.PAPER_TASKS))
    base = ToyConfig().to_dict()
    merged = {k: {**base[k], **v} if isinstance(v, Mapping) else v for k, v in raw.items()}
    cfg = dataclasses.replace(config_lib._build(ToyConfig, {k: v for k, v in merged.items()
                                                            if k != "tasks"}, ""), tasks=tasks)
    unknown = [t for t in cfg.tasks if t not in toy.TASKS]
    if unknown or not cfg.tasks:
        raise config_lib.ConfigError(f"tasks: {unknown or 'empty'}; choose from {', '.join(toy.TASKS)}")
    if cfg.model.V != toy.V or cfg.reg.method not in ("none", "ntp_pre"):
        raise config_lib.ConfigError(f"model.V must be {toy.V} and reg.method none or ntp_pre")
    if min(cfg.steps_per_task, cfg.batch_size, cfg.eval_every_steps, cfg.eval_problems) < 1:
        raise config_lib.ConfigError("steps_per_task, batch_size, eval_every_steps, eval_problems must be >= 1")
    return cfg


@dataclass(frozen=True)
class ToyResult:
    out_dir: Path
    tasks: tuple[str, ...]
    summary: dict[str, Any]

    def metrics(self) -> pd.DataFrame:
        return runs.load_runs(self.out_dir)

    def matrix(self) -> pd.DataFrame:
        return toy.accuracy_matrix(self.metrics(), self.tasks)


class ReplayBuffer:
    """Rows sampled from the frozen pi, `buffer` steps at a time; BOS tokens of `tasks` in turn."""

    def __init__(self, sampler: Callable, params: Any, tasks: tuple[str, ...], rows: int,
                 buffer: int, *, key: jax.Array):
        bos = jnp.array([toy.TASKS[t].bos for t in tasks], jnp.int32)
        self.prompt = bos[jnp.arange(buffer * rows) % len(tasks)][:, None]  # [buffer * R, 1]
        self.sampler, self.params, self.rows, self.buffer, self.key = sampler, params, rows, buffer, key
        self.chunk, self.index, self.sample_time_s = None, -1, 0.0

    def batch(self, step: int) -> jax.Array:
        index, offset = divmod(step, self.buffer)
        if index != self.index:
            start = time.perf_counter()
            rows = self.sampler(self.params, self.prompt, jax.random.fold_in(self.key, index))
            self.chunk = rows.reshape(self.buffer, self.rows, toy.T).block_until_ready()
            self.index, self.sample_time_s = index, self.sample_time_s + time.perf_counter() - start
        return self.chunk[offset]  # [R, T]


def train_sequence(cfg: ToyConfig, out_dir: str | Path, *, overwrite: bool = False,
                   on_eval: Callable[[dict[str, Any]], None] | None = None) -> ToyResult:
    """Train per `cfg` into `out_dir/cfg.name`; a finished run with the same config is reused."""
    runtime.configure()
    run_dir = Path(out_dir) / cfg.name
    if not overwrite and runs.is_finished(run_dir):
        runs.prepare_run_dir(cfg.to_dict(), run_dir, resume=True, overwrite=False)  # same config?
        return ToyResult(run_dir, cfg.tasks, runs.read_summary(run_dir))
    runs.prepare_run_dir(cfg.to_dict(), run_dir, resume=False, overwrite=True)
    root = jax.random.key(cfg.seed)
    graphdef, params = model_lib.init_model(cfg.model, key=jax.random.fold_in(root, KEY_MODEL))
    replay_rows = cfg.reg.replay_batch_size or cfg.batch_size
    optimizer = make_optimizer(cfg.opt, cfg.opt.warmup_tokens // (cfg.batch_size * toy.T), None)
    hidden = model_lib.make_hidden(graphdef)
    plain = make_train_step(make_objective(hidden, RegConfig()), optimizer,
                            auto_microbatches(cfg.batch_size, toy.T))
    with_replay = make_train_step(make_objective(hidden, cfg.reg), optimizer,
                                  auto_microbatches(cfg.batch_size, toy.T, replay_rows=replay_rows))
    replay_sampler = make_sampler(graphdef, length=toy.T, temperature=cfg.reg.temperature)
    greedy = make_sampler(graphdef, length=toy.T, temperature=0, eos_id=toy.EOS, stop_at_eos=True)
    sets = toy.eval_sets(cfg.tasks, cfg.eval_problems, key=jax.random.key(cfg.eval_seed))
    new_rows = jax.jit(toy.make_rows, static_argnums=(0, 1))
    opt_state, step, clock = optimizer.init(params), 0, {"train": 0.0, "eval": 0.0}
    no_replay = jnp.zeros((0, toy.T), jnp.int32)
    start = time.perf_counter()

    def evaluate(stage: int, stats: list[dict[str, jax.Array]]) -> None:
        t0 = time.perf_counter()
        acc = toy.accuracies(sets, toy.greedy_decoder(greedy, params))
        clock["eval"] += time.perf_counter() - t0
        mean = lambda k: float(np.mean([s[k] for s in jax.device_get(stats)])) if stats else None  # noqa: E731
        row = {"step": step, "stage": stage, "train_task": cfg.tasks[stage],
               "tokens": step * cfg.batch_size * toy.T, "train_ntp": mean("ntp"),
               "train_reg": mean("reg"), **{f"acc_{t}": float(a) for t, a in zip(cfg.tasks, acc)},
               "train_time_s": clock["train"], "eval_time_s": clock["eval"],
               "sample_time_s": sum(b.sample_time_s for b in buffers),
               "wall_time_s": time.perf_counter() - start}
        runs.append_metrics(run_dir, row)
        if on_eval is not None:
            on_eval(row)

    buffers: list[ReplayBuffer] = []
    evaluate(0, [])
    total = len(cfg.tasks) * cfg.steps_per_task
    with Progress(f"toy {cfg.name}", total=total, unit="step", enabled=cfg.progress) as bar:
        for stage, task in enumerate(cfg.tasks):
            replay = None
            if stage > 0 and cfg.reg.method == "ntp_pre":
                frozen = jax.tree.map(jnp.copy, params)  # pi; the trained params are donated
                replay = ReplayBuffer(replay_sampler, frozen, cfg.tasks[:stage], replay_rows,
                                      cfg.reg.buffer, key=jax.random.fold_in(
                                          jax.random.fold_in(root, KEY_REPLAY), stage))
                buffers.append(replay)
            stats = []
            for local in range(cfg.steps_per_task):
                t0 = time.perf_counter()
                batch = new_rows(task, cfg.batch_size, key=jax.random.fold_in(
                    jax.random.fold_in(root, KEY_DATA), step))
                if replay is None:
                    params, opt_state, out = plain(params, opt_state, {}, batch, no_replay)
                else:
                    params, opt_state, out = with_replay(params, opt_state, {}, batch,
                                                         replay.batch(local))
                stats.append(out)
                step += 1
                if (local + 1) % cfg.eval_every_steps == 0 or local + 1 == cfg.steps_per_task:
                    jax.block_until_ready(out)
                    clock["train"] += time.perf_counter() - t0
                    evaluate(stage, stats)
                    bar.update(0, **{t: f"{a:.2f}" for t, a in _last_acc(run_dir, cfg.tasks).items()})
                    stats = []
                else:
                    clock["train"] += time.perf_counter() - t0
                bar.update(1)
    return _finish(cfg, run_dir, clock, time.perf_counter() - start)


def _last_acc(run_dir: Path, tasks: tuple[str, ...]) -> dict[str, float]:
    row = runs.read_metrics(run_dir)[-1]
    return {t: row[f"acc_{t}"] for t in tasks}


def _finish(cfg: ToyConfig, run_dir: Path, clock: dict[str, float], wall_s: float) -> ToyResult:
    """Write summary.json: final accuracies, the accuracy matrix and the CL metrics."""
    matrix = toy.accuracy_matrix(runs.load_runs(run_dir), cfg.tasks)
    rows = runs.read_metrics(run_dir)
    summary = {"status": "finished", "stop_reason": "all_tasks", "step": rows[-1]["step"],
               "final": rows[-1], "accuracy_matrix": matrix.to_numpy().tolist(),
               "average_accuracy": toy.average_accuracy(matrix),
               "backward_transfer": toy.backward_transfer(matrix),
               "forgetting": dict(zip(cfg.tasks[:-1], toy.forgetting(matrix).tolist())),
               "train_time_s": clock["train"], "eval_time_s": clock["eval"], "wall_time_s": wall_s}
    runs.write_summary(run_dir, summary)
    return ToyResult(run_dir, cfg.tasks, summary)
