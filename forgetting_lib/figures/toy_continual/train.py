"""Sequential training over a list of toy tasks, with or without self-generated replay.

`train_sequence(cfg, out_dir) -> ToyResult` trains one model on `cfg.tasks` in order,
`steps_per_task` steps each, on fresh random problems every step, each task with a fresh
optimizer state (so `opt.schedule=cosine` decays the LR to 0 at the end of every task). With
`reg.method=ntp_pre` the model is frozen as pi at each task boundary, and every later step adds
`reg.coeff` x the next-token loss on `replay_batch_size` rows sampled from pi (temperature
`reg.temperature`, never stopped early) prompted by the BOS tokens of the tasks already learned,
in turn. Rows are sampled
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

from ... import config as config_lib, methods, runs, runtime
from ...config import ModelConfig, OptConfig, RegConfig
from ...engine import model as model_lib, regularisers
from ...engine.sampling import make_sampler
from ...engine.step import auto_microbatches, make_objective, make_optimizer, make_train_step
from ...progress import Progress
from . import tasks as toy

KEY_MODEL, KEY_DATA, KEY_REPLAY = 0, 1, 2  # named streams of the run's root key


@dataclass(frozen=True)
class ToyConfig:
    name: str = "toy"  # run folder name under out_dir
    seed: int = 0  # root of the init, training-problem and replay keys
    eval_seed: int = 1234  # seed of the fixed evaluation problems (independent of seed)
    tasks: tuple[str, ...] = toy.PAPER_TASKS  # trained in this order
    steps_per_task: int = 1000  # optimizer steps on each task
    batch_size: int = 256  # new-task rows per step
    eval_every_steps: int = 100  # evaluate every task this often (and at each task's end)
    eval_problems: int = 512  # fixed evaluation problems per task
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(D=128, L=2, H=16, V=toy.V, dtype="float32")
    )
    opt: OptConfig = field(
        default_factory=lambda: OptConfig(lr=1e-3, b2=0.99, warmup_tokens=0, weight_decay=0.0)
    )
    reg: RegConfig = field(default_factory=lambda: RegConfig(method="none", coeff=10.0, synth=True))
    progress: bool = True  # progress bar / periodic progress lines

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
    merged = {
        k: {**base[k], **v} if isinstance(v, Mapping) and isinstance(base.get(k), dict) else v
        for k, v in raw.items()
    }
    cfg = dataclasses.replace(config_lib.build_dataclass(ToyConfig, merged), tasks=tasks)
    unknown = [t for t in cfg.tasks if t not in toy.TASKS]
    if unknown or not cfg.tasks:
        raise config_lib.ConfigError(f"tasks: {unknown or 'empty'}; choose from {', '.join(toy.TASKS)}")
    supported = [r.name for r in regularisers.REGULARISERS.values() if _toy_supports(r)]
    if cfg.model.V != toy.V or cfg.reg.method not in supported:
        raise config_lib.ConfigError(f"model.V must be {toy.V} and reg.method one of {', '.join(supported)}")
    if min(cfg.steps_per_task, cfg.batch_size, cfg.eval_every_steps, cfg.eval_problems) < 1:
        raise config_lib.ConfigError(
            "steps_per_task, batch_size, eval_every_steps and eval_problems must be >= 1"
        )
    return cfg


def _toy_supports(method: regularisers.Regulariser) -> bool:
    """The toy trainer's step sees no frozen model and no Fisher, and its batches are never
    replaced: it runs plain training and the terms on self-generated replay rows alone."""
    return not (method.frozen or method.fisher or method.coeff_is_fraction)


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

    def __init__(
        self,
        sampler: Callable,
        params: Any,
        tasks: tuple[str, ...],
        rows: int,
        buffer: int,
        *,
        key: jax.Array,
    ):
        bos = jnp.array([toy.TASKS[t].bos for t in tasks], jnp.int32)
        self.prompt = bos[jnp.arange(buffer * rows) % len(tasks)][:, None]  # [buffer * R, 1]
        self.sampler, self.params, self.key = sampler, params, key
        self.rows, self.buffer = rows, buffer
        self.chunk, self.index, self.sample_time_s = None, -1, 0.0

    def batch(self, step: int) -> jax.Array:
        index, offset = divmod(step, self.buffer)
        if index != self.index:
            start = time.perf_counter()
            rows = self.sampler(self.params, self.prompt, jax.random.fold_in(self.key, index))
            self.chunk = rows.reshape(self.buffer, self.rows, toy.T).block_until_ready()
            self.index, self.sample_time_s = index, self.sample_time_s + time.perf_counter() - start
        return self.chunk[offset]  # [R, T]


def train_sequence(
    cfg: ToyConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
) -> ToyResult:
    """Train per `cfg` into `out_dir/cfg.name`; a finished run with the same config is reused.

    `on_eval(row)` is called with every metrics row as it is written (e.g. for a live plot).
    """
    runtime.configure()
    run_dir = Path(out_dir) / cfg.name
    with runs.lock(run_dir):  # one writer per run folder
        if not overwrite and runs.is_finished(run_dir):
            runs.prepare_run_dir(cfg.to_dict(), run_dir, resume=True, overwrite=False)  # same config?
            return ToyResult(run_dir, cfg.tasks, runs.read_summary(run_dir))
        runs.prepare_run_dir(cfg.to_dict(), run_dir, resume=False, overwrite=True)
        runs.write_config(run_dir, cfg.to_dict())
        loop = _Loop(cfg, run_dir, on_eval)
        loop.evaluate(0, [])
        with Progress(
            f"toy {cfg.name}", total=len(cfg.tasks) * cfg.steps_per_task, unit="step", enabled=cfg.progress
        ) as bar:
            for stage in range(len(cfg.tasks)):
                loop.train_task(stage, bar)
        return _finish(cfg, run_dir, loop.clock, time.perf_counter() - loop.start)


class _Loop:
    """The run's compiled functions and mutable state (params, step, clocks)."""

    def __init__(self, cfg: ToyConfig, run_dir: Path, on_eval: Callable | None):
        self.cfg, self.run_dir, self.on_eval = cfg, run_dir, on_eval
        self.root = jax.random.key(cfg.seed)
        graphdef, self.params = model_lib.init_model(cfg.model, key=jax.random.fold_in(self.root, KEY_MODEL))
        self.replay_rows = cfg.reg.replay_batch_size or cfg.batch_size
        # each task starts a fresh optimizer state (count, moments): the schedule (warm-up, cosine
        # decay to 0 at the end of the task) restarts at every task, as a finetuning run's would
        self.optimizer = make_optimizer(
            cfg.opt, cfg.opt.warmup_tokens // (cfg.batch_size * toy.T), cfg.steps_per_task
        )
        hidden = model_lib.make_hidden(graphdef)
        self.plain = make_train_step(
            make_objective(hidden, RegConfig()), self.optimizer, auto_microbatches(cfg.batch_size, toy.T)
        )
        self.with_replay = make_train_step(
            make_objective(hidden, cfg.reg),
            self.optimizer,
            auto_microbatches(cfg.batch_size, toy.T, replay_rows=self.replay_rows),
        )
        self.replay_sampler = make_sampler(graphdef, length=toy.T, temperature=cfg.reg.temperature)
        self.greedy = make_sampler(graphdef, length=toy.T, temperature=0, eos_id=toy.EOS, stop_at_eos=True)
        self.sets = toy.eval_sets(cfg.tasks, cfg.eval_problems, key=jax.random.key(cfg.eval_seed))
        self.new_rows = jax.jit(toy.make_rows, static_argnums=(0, 1))
        self.step, self.clock, self.buffers = 0, {"train": 0.0, "eval": 0.0}, []
        self.start = time.perf_counter()

    def replay_for(self, stage: int) -> ReplayBuffer | None:
        """Freeze the current model as pi and sample replay rows of the tasks before `stage`."""
        if stage == 0 or not regularisers.get(self.cfg.reg.method).replay_rows:
            return None
        frozen = jax.tree.map(jnp.copy, self.params)  # a copy: the trained params are donated
        key = jax.random.fold_in(jax.random.fold_in(self.root, KEY_REPLAY), stage)
        self.buffers.append(
            ReplayBuffer(
                self.replay_sampler,
                frozen,
                self.cfg.tasks[:stage],
                self.replay_rows,
                self.cfg.reg.buffer,
                key=key,
            )
        )
        return self.buffers[-1]

    def train_task(self, stage: int, bar: Progress) -> None:
        cfg, task = self.cfg, self.cfg.tasks[stage]
        opt_state, replay = self.optimizer.init(self.params), self.replay_for(stage)
        no_replay = jnp.zeros((0, toy.T), jnp.int32)
        data_key = jax.random.fold_in(self.root, KEY_DATA)
        stats = []
        for local in range(cfg.steps_per_task):
            t0 = time.perf_counter()
            batch = self.new_rows(task, cfg.batch_size, key=jax.random.fold_in(data_key, self.step))
            step_fn = self.plain if replay is None else self.with_replay
            rows = no_replay if replay is None else replay.batch(local)
            self.params, opt_state, out = step_fn(self.params, opt_state, {}, batch, rows)
            stats.append(out)
            self.step += 1
            due = (local + 1) % cfg.eval_every_steps == 0 or local + 1 == cfg.steps_per_task
            if due:
                jax.block_until_ready(out)
            self.clock["train"] += time.perf_counter() - t0
            if due:
                row = self.evaluate(stage, stats)
                bar.update(0, **{t: f"{row[f'acc_{t}']:.2f}" for t in cfg.tasks})
                stats = []
            bar.update(1)

    def evaluate(self, stage: int, stats: list[dict[str, jax.Array]]) -> dict[str, Any]:
        """Append one metrics row: every task's exact match, mean train losses, timings."""
        t0 = time.perf_counter()
        acc = toy.accuracies(self.sets, toy.greedy_decoder(self.greedy, self.params))
        self.clock["eval"] += time.perf_counter() - t0
        stats = jax.device_get(stats)
        mean = lambda k: float(np.mean([s[k] for s in stats])) if stats else None  # noqa: E731
        row = {
            "step": self.step,
            "stage": stage,
            "train_task": self.cfg.tasks[stage],
            "tokens": self.step * self.cfg.batch_size * toy.T,
            "train_ntp": mean("ntp"),
            "train_reg": mean("reg"),
            **{f"acc_{t}": float(a) for t, a in zip(self.cfg.tasks, acc)},
            "train_time_s": self.clock["train"],
            "eval_time_s": self.clock["eval"],
            "sample_time_s": sum(b.sample_time_s for b in self.buffers),
            "wall_time_s": time.perf_counter() - self.start,
        }
        runs.append_metrics(self.run_dir, row)
        if self.on_eval is not None:
            self.on_eval(row)
        return row


def _finish(cfg: ToyConfig, run_dir: Path, clock: dict[str, float], wall_s: float) -> ToyResult:
    """Write summary.json: final accuracies, the accuracy matrix and the CL metrics."""
    matrix = toy.accuracy_matrix(runs.load_runs(run_dir), cfg.tasks)
    rows = runs.read_metrics(run_dir)
    summary = {
        "status": "finished",
        "stop_reason": "all_tasks",
        "step": rows[-1]["step"],
        "final": rows[-1],
        "accuracy_matrix": matrix.to_numpy().tolist(),
        "average_accuracy": toy.average_accuracy(matrix),
        "backward_transfer": toy.backward_transfer(matrix),
        "forgetting": dict(zip(cfg.tasks[:-1], toy.forgetting(matrix).tolist())),
        "train_time_s": clock["train"],
        "eval_time_s": clock["eval"],
        "wall_time_s": wall_s,
    }
    runs.write_summary(run_dir, summary)
    return ToyResult(run_dir, cfg.tasks, summary)


RUN_VARIANTS = ("standard", "ntp_self")  # method names (methods.METHODS): no replay, self-generated NTP


def compare_replay(
    raw: Mapping[str, Any] | None, out_dir: str | Path, *, overwrite: bool = False
) -> dict[str, ToyResult]:
    """The paper's comparison: the same task sequence trained without replay (`standard`) and with
    self-generated NTP replay (`ntp_self`), one run folder each, named after the method."""
    raw = dict(raw or {})
    results = {}
    for name in RUN_VARIANTS:
        reg = {k.partition(".")[2]: v for k, v in methods.get(name).overrides.items() if k.startswith("reg.")}
        cfg = load_config({**raw, "name": name, "reg": {**raw.get("reg", {}), **reg}})
        results[name] = train_sequence(cfg, out_dir, overwrite=overwrite)
    return results


def summary_table(results: Mapping[str, ToyResult]) -> pd.DataFrame:
    """One row per run: final accuracy (%) per task, average accuracy, BWT and mean forgetting."""
    rows = {}
    for name, result in results.items():
        s = result.summary
        rows[name] = {
            **{t: 100 * s["final"][f"acc_{t}"] for t in result.tasks},
            "average": 100 * s["average_accuracy"],
            "BWT": 100 * s["backward_transfer"],
            "forgetting": 100 * float(np.mean(list(s["forgetting"].values()) or [0.0])),
            "wall_time_s": s["wall_time_s"],
        }
    return pd.DataFrame.from_dict(rows, orient="index").round(1)
