"""Will a run fit? Its programs compiled ahead of time from shapes alone: device memory and FLOPs.

`step_report(cfg)` builds the run's `Setup` as `assemble.build_setup` sizes it (batch rows, replay
rows, eval sets, teacher-cache forms, sampler batch), but from abstract values
(`jax.ShapeDtypeStruct`): no token file, no parent checkpoint, no device buffer. It then compiles
it with `assemble.compile_all`, the very function a run calls, so the train step, evaluators,
teacher passes and self-generated-replay sampler are exactly the run's, and reads each program's
`memory_analysis()` (argument, output, aliased and temporary bytes) and FLOPs.

`platform` builds the programs as for another platform (`runtime.targeting`): on a CPU laptop,
`platform="gpu"` gives an accelerator's activation dtype (model.dtype auto), microbatches (1),
loss chunks and eval/sampling batch sizes, while XLA compiles for the CPU. The memory is then
the CPU compiler's buffer assignment for the accelerator's shapes: an estimate of the GPU compile
(fusion and scheduling differ; the CUDA context and cuBLAS workspaces are not counted).

Memory of the run = the largest over its programs of
    temps + fresh outputs (output - aliased) + transient arguments + resident buffers,
where resident buffers live for the whole run (trainable tree, optimizer state, frozen parent,
Fisher, eval sets, teacher caches, sampled replay rows) and transient arguments are passed to one
program only (training batches, LoRA's merged parameters for evaluation, sampler prompts). A
program's own peak is arguments + temps + outputs - aliased (donated inputs alias outputs).
With a device mesh (`placement`, engine/sharding.py) the inputs carry its shardings and bytes and
FLOPs are per device (checked on a forced 4-device CPU mesh only).

FLOPs are the matmul FLOPs of the compiled HLO (dot instructions: 2 x output elements x
contracted size), each loop body times its trip count; `cost_analysis()["flops"]` is kept beside
them but counts each loop body once (a scan over microbatches or loss chunks is undercounted).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import config as config_lib, runtime
from . import (
    assemble,
    data as data_lib,
    lora as lora_lib,
    model as model_lib,
    regularisers,
    replay as replay_lib,
)
from .evaluate import teacher_forms
from .sharding import Placement
from .step import auto_microbatches, make_optimizer

GiB = 2**30


@dataclass(frozen=True)
class Program:
    """One compiled program's device memory (bytes) and FLOPs."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments
    temp_bytes: int
    code_bytes: int
    flops: float  # matmul FLOPs, loop bodies x trip counts
    xla_flops: float  # cost_analysis()["flops"]: each loop body counted once
    transient_bytes: int = 0  # arguments that exist only for this call
    resident_out_bytes: int = 0  # outputs that become resident buffers (a teacher cache)

    @property
    def peak_bytes(self) -> int:
        """Arguments + temps + outputs - aliased: the program's own footprint."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    def run_bytes(self, resident: int) -> int:
        """Device memory while it runs, with `resident` bytes of the run's buffers alive."""
        fresh = self.output_bytes - self.alias_bytes - self.resident_out_bytes
        return resident + self.transient_bytes + self.temp_bytes + fresh


def nbytes(tree: Any) -> int:
    """Bytes of a tree of arrays or shapes, on one device (a shape's shard where it has a sharding)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = x.shape if sharding is None else sharding.shard_shape(x.shape)
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


# Config keys the compiled programs hold as values, never as shapes (prefixes end with "."):
# points differing only in these compile programs of the same memory and FLOPs.
VALUE_KEYS = (
    *("run.", "opt.", "stop.", "data.path", "data.split_seed", "mix.path", "reg.fisher_batches"),
    *("log.every_tokens", "log.checkpoint_every_tokens", "log.progress", "log.wandb", "log.tensorboard"),
    *("parent.data_path", "parent.split_seed", "parent.seed", "parent.final_valid_ntp"),
    *("parent.dataset_token", "parent.tokenizer_fingerprint"),
)


def shape_key(
    cfg: config_lib.Config,
    *,
    platform: str | None = None,
    dtype: str | None = None,
    total_steps: int | None = None,
) -> tuple[Any, ...]:
    """A hashable key equal for configs whose `step_report`s compile the same shapes (same
    arguments as `step_report`)."""
    r = cfg.reg
    method = regularisers.get(r.method)
    flat = config_lib.flatten(cfg.to_dict())
    flat = {k: v for k, v in flat.items() if not any(k == v_ or k.startswith(v_) for v_ in VALUE_KEYS)}
    flat["model.load_path"] = bool(cfg.model.load_path)
    flat["model.dtype"] = dtype or cfg.model.dtype
    flat["mix.fraction"] = assemble.batch_rows(cfg)[2] > 0  # mixed rows are rows of the same batch
    flat["reg.coeff"] = r.coeff if method.coeff_is_fraction else r.coeff != 0  # 0 drops the term
    flat["reg.temperature"] = r.temperature == 0  # greedy or sampled
    flat["reg.top_p"] = r.top_p < 1  # nucleus or the full softmax
    platform = platform or runtime.platform()
    if cfg.model.load_path and r.synth:  # the sampler's batch may depend on the run's length
        with runtime.targeting(platform):
            rows = assemble.replay_row_counts(cfg)[1]
            flat["sampler_chunks"] = assemble.sampler_chunks(cfg, rows, total_steps)
    return (platform, *sorted(flat.items()))


def abstract_setup(
    cfg: config_lib.Config, *, total_steps: int | None = None, placement: Placement | None = None
) -> tuple[assemble.Setup, Any, Any]:
    """(Setup, trainable shapes, optimizer-state shapes) of a resolved config (a finetune's
    architecture already taken from its parent), sized as `assemble.build_setup` sizes the run,
    without opening a file or allocating. `total_steps` (the run's length, if known) only sets
    the LR schedule's constants and bounds the sampler's batch; a num_epochs run's length needs
    its token file, so None there (the sampler batch is then the largest the run could use).
    `placement`: a device mesh the abstract inputs are sharded over (None: one device)."""
    m, d, r = cfg.model, cfg.data, cfg.reg
    placement = placement or Placement()
    method = regularisers.get(r.method)
    _, new_rows, mix_rows = assemble.batch_rows(cfg)
    tokens_per_step = d.batch_size * d.T
    if total_steps is None and cfg.stop.num_epochs is None:
        total_steps = assemble.total_steps_for(cfg, tokens_per_step, 1.0)
    graphdef, params = model_lib.abstract_params(m)
    params = placement.abstract(params)
    setup = assemble.Setup(
        cfg=cfg,
        graphdef=graphdef,
        optimizer=make_optimizer(cfg.opt, math.ceil(cfg.opt.warmup_tokens / tokens_per_step), total_steps),
        batcher=data_lib.Batcher(None, new_rows, cfg.run.seed, None, mix_rows),  # type: ignore[arg-type]
        eval_sets={},
        tokens_per_step=tokens_per_step,
        total_steps=total_steps,
        eval_every=1,
        checkpoint_every=None,
        num_params=model_lib.param_formula(m),
        placement=placement,
    )
    eval_rows = d.eval_batch_size or assemble.auto_eval_rows(d.T, placement.batch_devices)
    sets = {"valid": (d.valid_tokens, d.T)}
    if mix_rows and cfg.mix.valid_tokens > 0:
        sets["mix"] = (cfg.mix.valid_tokens, d.T)
    if m.load_path:
        setup.ctx["frozen"] = params
        if cfg.parent.valid_tokens > 0:  # the parent's data is assumed present (its rows: `prev`)
            sets["prev"] = (cfg.parent.valid_tokens, cfg.parent.T or d.T)
        setup.replay_rows, source_rows = assemble.replay_row_counts(cfg)
        if r.synth and (setup.replay_rows or method.fisher):
            setup.replay = replay_lib.SelfGeneratedReplay(
                graphdef,
                params,
                0,  # the dataset-id token: a value, not a shape
                source_rows,
                d.T,
                r.buffer,
                jax.eval_shape(lambda: jax.random.key(0)),
                r.temperature,
                assemble.sampler_chunks(cfg, source_rows, total_steps),
                top_p=r.top_p,
                reuse=r.reuse,
                seed=cfg.run.seed,
                placement=placement,
            )
        if method.fisher:
            setup.ctx["fisher"] = params  # the diagonal Fisher has the parameters' shapes
    for name, (tokens, T) in sets.items():
        if tokens > 0:  # (a run without validation rows stops at build_setup, naming the file)
            setup.eval_sets[name] = _eval_set(math.ceil(tokens / T), T, eval_rows, placement)
    if m.load_path and cfg.log.eval_kl:
        shapes = {k: t.shape for k, (t, _) in setup.eval_sets.items()}
        setup.teacher_forms = teacher_forms(shapes, m.D, m.V, cfg.log.teacher_cache_mb)
    trainable = params
    if setup.lora:
        adapters = jax.eval_shape(
            lambda p: lora_lib.init_adapters(p, cfg.lora.rank, key=jax.random.key(0)), params
        )
        trainable = placement.abstract(adapters)
    opt_state = placement.abstract(jax.eval_shape(setup.optimizer.init, trainable))
    return setup, trainable, opt_state


def _eval_set(rows: int, T: int, eval_rows: int, placement: Placement) -> tuple[Any, Any]:
    """Shapes of an eval set of `rows` rows, batched as `data.batched` batches them (called on
    zero-width rows, so only its [nb, Be] layout is computed)."""
    tokens, mask = data_lib.batched(np.zeros((rows, 0), np.int32), eval_rows, placement.batch_devices)
    nb, Be = mask.shape
    return (
        jax.ShapeDtypeStruct((nb, Be, T), jnp.int32, sharding=placement.rows_sharding(3, axis=1)),
        jax.ShapeDtypeStruct((nb, Be), jnp.float32, sharding=placement.rows_sharding(2, axis=1)),
    )


def step_report(
    cfg: config_lib.Config,
    *,
    platform: str | None = None,
    dtype: str | None = None,
    total_steps: int | None = None,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """Compile a resolved config's programs from shapes and report their memory and FLOPs.

    `platform`: build them as for this platform ("gpu", "tpu", "cpu"; None: this process's);
    `dtype`: force model.dtype (e.g. "bfloat16"; None: the config's, "auto" resolved for the
    platform); `total_steps` and `placement`: see `abstract_setup`. Keys: params, trainable_params,
    dtype, platform, microbatches, batch_rows, replay_rows, T, flops_per_step (the train step's
    compiled matmul FLOPs), flops_analytic (model.flops_per_token x B T), step_bytes (the step's
    own peak), peak_bytes and peak_program (the run's largest footprint and where),
    resident_bytes (name -> bytes), programs (name -> Program fields), compile_s.
    """
    if dtype is not None:
        cfg = cfg.replace({"model.dtype": dtype})
    platform = platform or runtime.platform()
    start = time.perf_counter()
    with runtime.targeting(platform):
        setup, trainable, opt_state = abstract_setup(cfg, total_steps=total_steps, placement=placement)
        assemble.compile_all(setup, trainable, opt_state)
        act_dtype = model_lib.resolve_dtype(cfg.model.dtype)
        replace = regularisers.get(cfg.reg.method).coeff_is_fraction
        d = cfg.data
        micro = auto_microbatches(  # as compile_all counts the step's gradient-accumulation slices
            d.batch_size,
            d.T,
            d.microbatch_rows,
            0 if replace else setup.replay_rows,
            setup.placement.batch_devices,
        )
    compile_s = time.perf_counter() - start
    resident = _resident(setup, trainable, opt_state)
    programs = _programs(setup, trainable)
    totals = {name: p.run_bytes(sum(resident.values())) for name, p in programs.items()}
    peak_program = max(totals, key=totals.get)
    step = programs["step"]
    return {
        "params": model_lib.param_formula(cfg.model),
        "trainable_params": sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)),
        "dtype": np.dtype(act_dtype).name,
        "platform": platform,
        "microbatches": micro,
        "batch_rows": d.batch_size,
        "replay_rows": setup.replay_rows,
        "T": d.T,
        "flops_per_step": step.flops,
        "flops_analytic": model_lib.flops_per_token(cfg.model, d.T) * d.batch_size * d.T,
        "step_bytes": step.peak_bytes,
        "peak_bytes": totals[peak_program],
        "peak_program": peak_program,
        "resident_bytes": resident,
        "programs": {name: {**asdict(p), "peak_bytes": p.peak_bytes} for name, p in programs.items()},
        "compile_s": compile_s,
    }


def _resident(setup: assemble.Setup, trainable: Any, opt_state: Any) -> dict[str, int]:
    """Buffers alive for the whole run (bytes by name)."""
    out = {"trainable": nbytes(trainable), "opt_state": nbytes(opt_state)}
    out.update({name: nbytes(value) for name, value in setup.ctx.items()})  # frozen, fisher
    out.update({f"eval_{name}": nbytes(pair) for name, pair in setup.eval_sets.items()})
    for name in setup.eval_sets:
        teacher = setup.compiled.get(f"teacher_{name}")
        if teacher is not None:
            out[f"teacher_{name}"] = nbytes(teacher.out_info[1])
    replay = setup.replay
    if isinstance(replay, replay_lib.SelfGeneratedReplay):  # the rows of one sampler call
        rows = replay.chunks_per_call * replay.buffer * replay.batch_size
        out["replay_rows"] = rows * replay.T * 4 // setup.placement.batch_devices
    return out


def _programs(setup: assemble.Setup, trainable: Any) -> dict[str, Program]:
    """The compiled programs with what of their arguments and outputs is not resident."""
    d, devices = setup.cfg.data, setup.placement.batch_devices  # rows are split over a mesh
    batches = (setup.batcher.batch_size + setup.replay_rows) * d.T * 4 // devices  # int32, new + replay
    merged = nbytes(jax.eval_shape(setup.compiled["materialize"], trainable, setup.ctx)) if setup.lora else 0
    out = {"step": _program("step", setup.compiled["step"], transient=batches)}
    for name in setup.eval_sets:
        teacher = setup.compiled.get(f"teacher_{name}")
        if teacher is not None:
            cache = nbytes(teacher.out_info[1])
            out[f"teacher_{name}"] = _program(f"teacher_{name}", teacher, resident_out=cache)
        out[f"eval_{name}"] = _program(f"eval_{name}", setup.compiled[f"eval_{name}"], transient=merged)
    replay = setup.replay
    if isinstance(replay, replay_lib.SelfGeneratedReplay) and replay._sampler is not None:
        rows = replay.chunks_per_call * replay.buffer * replay.batch_size
        out["sampler"] = _program("sampler", replay._sampler, transient=rows * 4 // devices)  # [rows, 1]
    return out


def _program(name: str, compiled: Any, *, transient: int = 0, resident_out: int = 0) -> Program:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older JAX: one dict per device
    return Program(
        name,
        int(mem.argument_size_in_bytes),
        int(mem.output_size_in_bytes),
        int(mem.alias_size_in_bytes),
        int(mem.temp_size_in_bytes),
        int(mem.generated_code_size_in_bytes),
        hlo_matmul_flops(compiled.as_text()),
        float((cost or {}).get("flops", 0.0)),
        transient,
        resident_out,
    )


# ----------------------------------------------------------------------------------------------
# Matmul FLOPs of an HLO module's text, loops times their trip counts

_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_DIMS = re.compile(r"^\w+\[([\d,]*)\]")
_CALLED = re.compile(
    r"\b(calls|to_apply|body|branch_computations|true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_OPERAND = re.compile(r"%([\w.\-]+)")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def hlo_matmul_flops(text: str) -> float:
    """2 x output elements x contracted size summed over the `dot`s of an HLO module's text,
    each computation counted as often as it runs: a while loop's body times its known trip
    count (once where unknown), a conditional's costliest branch."""
    computations: dict[str, list[tuple[str, str, str, str]]] = {}  # name -> (name, shape, op, rest)
    entry, current = None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction:
            shape, op, rest = _split_instruction(instruction.group(2))
            computations[current].append((instruction.group(1), shape, op, rest))
    memo: dict[str, float] = {}

    def flops(name: str) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # guards against a malformed (recursive) module
        shapes = {n: s for n, s, _, _ in computations.get(name, [])}
        total = 0.0
        for _, shape, op, rest in computations.get(name, []):
            if op == "dot":
                total += _dot_flops(shape, rest, shapes)
            called = {}
            for key, value in _CALLED.findall(rest):
                called[key] = [c.strip().lstrip("%") for c in value.strip("{}").split(",") if c.strip()]
            if op == "while":
                trip = _TRIP.search(rest)
                total += (int(trip.group(1)) if trip else 1) * sum(map(flops, called.get("body", [])))
            elif op == "conditional":
                branches = called.get("branch_computations", []) + [
                    c for k in ("true_computation", "false_computation") for c in called.get(k, [])
                ]
                total += max(map(flops, branches), default=0.0)
            else:
                total += sum(flops(c) for k in ("calls", "to_apply") for c in called.get(k, []))
        memo[name] = total
        return total

    return flops(entry) if entry is not None else 0.0


def _split_instruction(rhs: str) -> tuple[str, str, str]:
    """(result shape, opcode, operands and attributes) of an instruction's right-hand side."""
    if rhs.startswith("("):  # a tuple shape: up to its matching parenthesis
        depth = 0
        for i, ch in enumerate(rhs):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                shape, rest = rhs[: i + 1], rhs[i + 1 :].lstrip()
                break
        else:
            return rhs, "", ""
    else:
        shape, _, rest = rhs.partition(" ")
    op, _, rest = rest.partition("(")
    return shape, op.strip(), rest


def _dims(shape: str) -> list[int] | None:
    match = _DIMS.match(shape)
    return None if match is None else [int(x) for x in match.group(1).split(",") if x]


def _dot_flops(shape: str, rest: str, shapes: dict[str, str]) -> float:
    out, operands = _dims(shape), rest.split(")", 1)[0].strip()
    names = _OPERAND.findall(operands)
    lhs = _dims(shapes.get(names[0], "")) if names else None
    lhs = lhs or _dims(operands)  # printed with its shape: `dot(f32[64,128]{1,0} %a, ...)`
    contracting = _CONTRACTING.search(rest)
    if out is None or lhs is None or contracting is None:
        return 0.0
    size = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
    return 2.0 * math.prod(out) * size
