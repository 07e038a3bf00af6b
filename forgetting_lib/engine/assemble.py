"""Assembling a run before its loop: data, parent, replay source, optimizer, compiled functions.

`build_setup(cfg)` opens every dataset and the parent (failing early, with a message that names
the file, if anything is missing or too small); `compile_all` compiles the train step and the
evaluators ahead of time so that compilation never counts as training time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .. import config as config_lib, runtime
from ..prep.tokenizer import load_tokenizer
from . import data as data_lib, lora as lora_lib, model as model_lib, regularisers, replay as replay_lib
from .evaluate import make_evaluator, make_teacher_pass, teacher_forms
from .finetune import Parent, load_parent
from .sharding import Placement, make_mesh
from .step import auto_microbatches, full_params, make_objective, make_optimizer, make_train_step

# Named streams of the run's root key (see STYLE: one root key, split by name).
KEY_REPLAY, KEY_LORA = 2, 3


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
    eval_every: int  # steps between evaluations
    checkpoint_every: int | None  # steps between checkpoints (None: only at the end)
    num_params: int
    parent: Parent | None = None
    replay: replay_lib.RealReplay | replay_lib.SelfGeneratedReplay | None = None
    replay_rows: int = 0  # rows drawn from `replay` each step
    ctx: dict[str, Any] = field(default_factory=dict)  # frozen parent / Fisher for the step
    compiled: dict[str, Callable] = field(default_factory=dict)
    # KL to the parent in evaluation (log.eval_kl): per eval set, the form of the parent's cached
    # side (evaluate.TEACHER_FORMS) and, once computed, the cache itself
    teacher_forms: dict[str, str] = field(default_factory=dict)
    teacher_cache: dict[str, Any] = field(default_factory=dict)
    placement: Placement = field(default_factory=Placement)  # one device, or a mesh (engine/sharding.py)

    @property
    def lora(self) -> bool:
        return self.cfg.lora.rank > 0


def auto_eval_rows(T: int, devices: int = 1) -> int:
    """Evaluation rows per scan step: ~1K tokens on a CPU (cache-resident; measured fastest for
    the tutorial model, 20% faster than 16K tokens), 64K tokens on accelerators; a multiple of
    the `devices` a mesh splits rows over."""
    rows = max(1, (1024 if runtime.platform() == "cpu" else 65536) // T)
    return math.ceil(rows / devices) * devices


def total_steps_for(cfg: config_lib.Config, tokens_per_step: int, rows_per_epoch_step: float) -> int | None:
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


def batch_rows(cfg: config_lib.Config) -> tuple[int, int, int]:
    """(replay rows replacing part of each batch (reg.method=replace), rows from the training
    data, of which from mix.path)."""
    d, r = cfg.data, cfg.reg
    replace_rows = math.floor(r.coeff * d.batch_size) if regularisers.get(r.method).coeff_is_fraction else 0
    new_rows = d.batch_size - replace_rows  # rows of each batch from the (new) training data
    return replace_rows, new_rows, data_lib.mix_row_count(new_rows, cfg.mix.fraction)


def replay_row_counts(cfg: config_lib.Config) -> tuple[int, int]:
    """A finetune's (replay rows fed to each step, rows per batch of its replay source): the
    replaced rows (replace), reg.replay_batch_size or data.batch_size (ntp_pre, kl_pre), else 0
    rows per step (a source, if any, serves the Fisher's batches)."""
    r, method = cfg.reg, regularisers.get(cfg.reg.method)
    if method.coeff_is_fraction:  # replay rows replace part of every batch
        rows = batch_rows(cfg)[0]
    else:
        rows = (r.replay_batch_size or cfg.data.batch_size) if method.replay_rows else 0
    return rows, rows or r.replay_batch_size or cfg.data.batch_size


def sampler_chunks(cfg: config_lib.Config, source_rows: int, total_steps: int | None) -> int:
    """Self-generated replay chunks sampled per sampler call (replay.auto_chunks_per_call)."""
    r = cfg.reg
    chunks = None if total_steps is None else math.ceil(total_steps / (r.buffer * r.reuse))
    return replay_lib.auto_chunks_per_call(
        r.buffer * source_rows, chunks, model_lib.kv_cache_bytes(cfg.model, cfg.data.T)
    )


def build_setup(cfg: config_lib.Config) -> Setup:
    """Open the data, size the run, and build (not yet compile) the model and optimizer."""
    d, m = cfg.data, cfg.model
    placement = Placement(make_mesh(cfg.mesh))
    placement.check_rows(d.batch_size, "data.batch_size")
    if d.microbatch_rows:
        placement.check_rows(d.microbatch_rows, "data.microbatch_rows")
    _, new_rows, mix_rows = batch_rows(cfg)
    main = data_lib.open_rows(
        d.path,
        T=d.T,
        valid_tokens=d.valid_tokens,
        split_seed=d.split_seed,
        vocab_size=m.V,
        min_train_rows=new_rows - mix_rows,
    )
    eval_rows = d.eval_batch_size or auto_eval_rows(d.T, placement.batch_devices)
    placement.check_rows(eval_rows, "data.eval_batch_size")
    multiple = placement.batch_devices
    eval_sets = {"valid": data_lib.eval_batches(main, eval_rows, multiple=multiple)}
    mix = None
    if mix_rows:
        mix = data_lib.open_rows(
            cfg.mix.path,
            T=d.T,
            valid_tokens=cfg.mix.valid_tokens,
            split_seed=d.split_seed,
            vocab_size=m.V,
            min_train_rows=mix_rows,
        )
        if cfg.mix.valid_tokens > 0:
            eval_sets["mix"] = data_lib.eval_batches(mix, eval_rows, multiple=multiple)
    parent_fp = cfg.parent.tokenizer_fingerprint if m.load_path else ""
    if parent_fp:
        _check_tokenizer(main, parent_fp, f"the parent run {m.load_path}")
    if mix is not None:
        _check_tokenizer(mix, _fingerprint(main), f"this run's training data {main.path}")
    tokens_per_step = d.batch_size * d.T
    total = total_steps_for(cfg, tokens_per_step, (new_rows - mix_rows) / len(main.train_rows))
    warmup_steps = math.ceil(cfg.opt.warmup_tokens / tokens_per_step)
    ckpt = cfg.log.checkpoint_every_tokens
    setup = Setup(
        cfg=cfg,
        graphdef=model_lib.abstract_params(m)[0],
        optimizer=make_optimizer(cfg.opt, warmup_steps, total),
        batcher=data_lib.Batcher(main, new_rows, cfg.run.seed, mix, mix_rows),
        eval_sets=eval_sets,
        tokens_per_step=tokens_per_step,
        total_steps=total,
        eval_every=max(1, round(cfg.log.every_tokens / tokens_per_step)),
        checkpoint_every=None if ckpt is None else max(1, round(ckpt / tokens_per_step)),
        num_params=model_lib.param_formula(m),
        placement=placement,
    )
    if m.load_path:
        _attach_parent(setup, eval_rows)
        if cfg.log.eval_kl:
            shapes = {k: t.shape for k, (t, _) in setup.eval_sets.items()}
            setup.teacher_forms = teacher_forms(shapes, m.D, m.V, cfg.log.teacher_cache_mb)
    setup.eval_sets = {  # on a mesh, each eval batch's rows are split: [nb, Be, T], [nb, Be] along Be
        k: tuple(placement.rows(lambda a, b, x=x: x[:, a:b], x.shape, axis=1) for x in (t, msk))
        for k, (t, msk) in setup.eval_sets.items()
    }
    return setup


def _attach_parent(setup: Setup, eval_rows: int) -> None:
    """Finetuning: the frozen parent, its validation rows as `prev`, the replay source, the Fisher."""
    cfg, p, r = setup.cfg, setup.cfg.parent, setup.cfg.reg
    method = regularisers.get(r.method)
    setup.parent = load_parent(cfg, setup.placement)
    setup.ctx["frozen"] = setup.parent.params
    try:
        prev = data_lib.open_rows(
            p.data_path,
            T=p.T,
            valid_tokens=p.valid_tokens,
            split_seed=p.split_seed,
            vocab_size=cfg.model.V,
            min_train_rows=0,
        )
    except (data_lib.DataError, ValueError) as err:
        if not r.synth:
            raise data_lib.DataError(
                f"the parent's training data {p.data_path} is gone or unreadable ({err}); real "
                f"replay and the old-data (`prev`) evaluation need it. Without the old data, use "
                f"self-generated replay: reg.synth=true (forgetting then goes unmeasured)"
            ) from err
        print(
            f"warning: parent data {p.data_path} unavailable ({err}); self-generated replay only, "
            f"no `prev` evaluation or forgetting metric",
            flush=True,
        )
        prev = None
    if prev is not None:
        if p.tokenizer_fingerprint:
            _check_tokenizer(prev, p.tokenizer_fingerprint, f"the parent run {cfg.model.load_path}")
        multiple = setup.placement.batch_devices
        setup.eval_sets["prev"] = data_lib.eval_batches(prev, eval_rows, multiple=multiple)
    setup.replay_rows, source_rows = replay_row_counts(cfg)
    if setup.replay_rows == 0 and not method.fisher:
        return
    if r.synth:
        token = p.dataset_token if p.dataset_token >= 0 or prev is None else prev.dataset_token
        if token < 0:
            raise data_lib.DataError(
                f"the parent {cfg.model.load_path} records no dataset-id token "
                f"and its data {p.data_path} is gone: cannot prompt the sampler"
            )
        prompt = token if r.prompt == "id" else chat_prompt(rows_tokenizer(setup.batcher.main))
        if r.prompt == "chat" and len(prompt) >= cfg.data.T:
            raise data_lib.DataError(
                f"reg.prompt=chat: the chat prompt is {len(prompt)} tokens, data.T={cfg.data.T} leaves "
                f"nothing to sample; raise data.T or use reg.prompt=id"
            )
        setup.replay = replay_lib.SelfGeneratedReplay(
            setup.graphdef,
            setup.parent.params,
            prompt,
            source_rows,
            cfg.data.T,
            r.buffer,
            jax.random.fold_in(jax.random.key(cfg.run.seed), KEY_REPLAY),
            r.temperature,
            sampler_chunks(cfg, source_rows, setup.total_steps),
            top_p=r.top_p,
            reuse=r.reuse,
            seed=cfg.run.seed,
            placement=setup.placement,
        )
    else:
        if len(prev.train_rows) < source_rows:
            raise data_lib.DataError(
                f"{p.data_path}: the parent's train split has "
                f"{len(prev.train_rows)} rows, fewer than the {source_rows} replay "
                f"rows per step; lower reg.replay_batch_size or use reg.synth=true"
            )
        setup.replay = replay_lib.RealReplay(prev, source_rows, cfg.run.seed)
    if method.fisher:
        batches = [setup.placement.replicate(setup.replay.batch(i)) for i in range(r.fisher_batches)]
        setup.ctx["fisher"] = setup.placement.put(
            replay_lib.diagonal_fisher(model_lib.make_hidden(setup.graphdef), setup.parent.params, batches)
        )


def rows_tokenizer(rows: data_lib.TokenRows) -> Any:
    """The tokenizer that made a token file (its sidecar's `tokenizer_dir`)."""
    folder = rows.sidecar.get("tokenizer_dir")
    if not folder:
        raise data_lib.DataError(f"{rows.path}: its sidecar names no tokenizer_dir; re-binarize it")
    return load_tokenizer(folder)


def chat_prompt(tok: Any) -> tuple[int, ...]:
    """reg.prompt=chat: the tokenizer's chat template for an empty conversation, up to the
    assistant's turn (prep/tokenizer.py), as the self-generated rows' prompt."""
    if not hasattr(tok, "chat_prompt"):
        raise data_lib.DataError(
            f"reg.prompt=chat needs a Hugging Face tokenizer with a chat template; {tok} has none "
            f"(use reg.prompt=id)"
        )
    return tuple(tok.chat_prompt())


def _fingerprint(rows: data_lib.TokenRows) -> str:
    return str(rows.sidecar.get("tokenizer_fingerprint", ""))


def _check_tokenizer(rows: data_lib.TokenRows, expected: str, whose: str) -> None:
    """Token ids mean pieces of one tokenizer: a file made by another one is an error."""
    found = _fingerprint(rows)
    if found and expected and found != expected:
        raise data_lib.DataError(
            f"{rows.path} was made with tokenizer {found[:12]} ({rows.sidecar.get('tokenizer_dir') or '?'}) "
            f"but {whose} uses tokenizer {expected[:12]}: its token ids name other pieces; "
            f"re-binarize it with that tokenizer (python -m forgetting_lib binarize --tokenizer DIR ...)"
        )


def compile_all(setup: Setup, trainable: Any, opt_state: Any) -> float:
    """Ahead-of-time compile the train step, the evaluators, the parent's passes that fill the
    evaluation's teacher cache, and the replay sampler; returns compile seconds."""
    start = time.perf_counter()
    with setup.placement.active():  # a mesh's activation constraints apply while tracing
        _compile_all(setup, trainable, opt_state)
    return time.perf_counter() - start


def _compile_all(setup: Setup, trainable: Any, opt_state: Any) -> None:
    hidden = model_lib.make_hidden(setup.graphdef)
    d, r, place = setup.cfg.data, setup.cfg.reg, setup.placement
    rows = place.rows_sharding()
    new = jax.ShapeDtypeStruct((setup.batcher.batch_size, d.T), jnp.int32, sharding=rows)
    replay = jax.ShapeDtypeStruct((setup.replay_rows, d.T), jnp.int32, sharding=rows)
    place.check_rows(setup.replay_rows, "replay rows per step (reg.replay_batch_size or reg.coeff x batch)")
    replace = regularisers.get(r.method).coeff_is_fraction
    micro = auto_microbatches(
        d.batch_size, d.T, d.microbatch_rows, 0 if replace else setup.replay_rows, place.batch_devices
    )
    materialize = (lambda tr, ctx: lora_lib.merge(ctx["frozen"], tr)) if setup.lora else full_params
    objective = make_objective(hidden, r, materialize)
    shardings = None if place.mesh is None else (place.tree(trainable), place.tree(opt_state))
    setup.compiled["step"] = (
        make_train_step(objective, setup.optimizer, micro, replace, shardings)
        .lower(trainable, opt_state, setup.ctx, new, replay)
        .compile()
    )
    params = jax.eval_shape(materialize, trainable, setup.ctx)
    setup.compiled["materialize"] = jax.jit(materialize, out_shardings=place.tree(params))
    params = place.abstract(params)
    for name, (tokens, mask) in setup.eval_sets.items():
        form = setup.teacher_forms.get(name)
        teacher_in = setup.ctx["frozen"] if form == "params" else None
        if form in ("probs", "hidden"):
            teacher_pass = make_teacher_pass(hidden, form).lower(setup.ctx["frozen"], tokens, mask).compile()
            setup.compiled[f"teacher_{name}"] = teacher_pass
            teacher_in = teacher_pass.out_info[1]  # the cache's shapes
        evaluator = make_evaluator(hidden, form)
        setup.compiled[f"eval_{name}"] = evaluator.lower(params, teacher_in, tokens, mask).compile()
    if isinstance(setup.replay, replay_lib.SelfGeneratedReplay):
        setup.replay.compile()
