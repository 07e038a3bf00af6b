"""The optimizer and the one jitted train step shared by pretraining and every finetuning method.

The objective is NTP(new batch) + coeff x R, with R the registry term of `reg.method`
(engine/regularisers.py: every method, its literature name and what it needs). The step
differentiates only the *trainable* tree: the full parameters for ordinary training, the LoRA
adapters for a LoRA run (`materialize` turns the trainable tree into full parameters). The frozen
parent (teacher, EWC and L2-SP anchor, LoRA base) and the EWC Fisher travel in `ctx` and are never
donated.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .. import runtime
from ..config import OptConfig, RegConfig
from . import regularisers
from .losses import ntp_from_hidden
from .regularisers import Hidden

# Our code is clean under jax_numpy_dtype_promotion="strict" (the tests run with it); optax's
# update is not, so it is traced with JAX's standard promotion rules, whatever the global setting.
THIRD_PARTY_PROMOTION = jax.numpy_dtype_promotion("standard")
Materialize = Callable[[Any, dict[str, Any]], Any]  # (trainable, ctx) -> full params


def lr_schedule(opt: OptConfig, warmup_steps: int, total_steps: int | None) -> optax.Schedule:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to 0 at `total_steps`."""

    def schedule(count: jax.Array) -> jax.Array:
        lr = opt.lr * jnp.minimum(1.0, (count + 1) / max(warmup_steps, 1))
        if opt.schedule == "cosine":
            span = max((total_steps or 1) - warmup_steps, 1)
            progress = jnp.clip((count - warmup_steps) / span, 0.0, 1.0)
            lr = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return lr

    return schedule


def make_optimizer(
    opt: OptConfig, warmup_steps: int, total_steps: int | None
) -> optax.GradientTransformation:
    """AdamW with the run's schedule; no gradient clipping (as in the paper). Weight decay applies
    to matrices only (every parameter of the paper's model; not the norm gains and biases of the
    Llama family)."""
    return optax.adamw(
        lr_schedule(opt, warmup_steps, total_steps),
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
    )


def full_params(trainable: Any, ctx: dict[str, Any]) -> Any:
    """Ordinary training: the trainable tree is the full parameter tree."""
    return trainable


def make_objective(hidden: Hidden, reg: RegConfig, materialize: Materialize = full_params) -> Callable:
    """objective(trainable, ctx, new [b, T], replay [r, T]) -> (total, (ntp, reg)).

    R is the registry term of `reg.method`; ctx holds "frozen" (the parent's params) and
    "fisher" when the method needs them.
    """
    term, coeff = regularisers.get(reg.method).term, reg.coeff

    def objective(trainable, ctx, new, replay):
        params = materialize(trainable, ctx)
        h, w = hidden(params, new)
        if term is None:
            ntp, reg_value = ntp_from_hidden(h, w, new), jnp.zeros((), jnp.float32)
        else:
            ntp, reg_value = term(regularisers.TermInputs(hidden, params, ctx, new, replay, h, w))
        loss = jnp.mean(ntp)
        # coeff 0 must be plain finetuning exactly, so the unused term stays out of the graph
        total = loss + coeff * reg_value if term is not None and coeff else loss
        return total, (loss, reg_value)

    return objective


def make_train_step(
    objective: Callable,
    optimizer: optax.GradientTransformation,
    microbatches: int = 1,
    replace: bool = False,
    shardings: tuple[Any, Any] | None = None,
) -> Callable:
    """step(trainable, opt_state, ctx, new [B, T], replay [R, T]) -> (trainable, opt_state, stats).

    Jitted with the trainable tree and optimizer state donated. `replace` (experience replay at a
    fixed ratio) appends the replay rows to the new rows and trains on both as one batch. With
    `microbatches` > 1 the gradient is accumulated over that many equal slices of both batches in a
    `lax.scan` (the same mean up to float summation order; on a CPU, slices of ~512 tokens keep
    activations in cache: ~1.5x faster for the tutorial model).

    `shardings` (on a device mesh, engine/sharding.py): the (trainable, optimizer state)
    shardings the step returns its state in, so that every step keeps the same placement. The
    microbatch slices are then strided (slice m holds rows m, m + M, ...), so that every slice
    keeps rows on every device.
    """
    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def grads(trainable, ctx, new, replay):
        if replace:
            new, replay = jnp.concatenate([new, replay], axis=0), replay[:0]
        if microbatches == 1:
            return value_and_grad(trainable, ctx, new, replay)
        T = new.shape[-1]
        if shardings is None:
            slices = (
                new.reshape(microbatches, new.shape[0] // microbatches, T),  # [M, B/M, T]
                replay.reshape(microbatches, replay.shape[0] // microbatches, T),
            )  # [M, R/M, T]
        else:
            slices = (
                new.reshape(new.shape[0] // microbatches, microbatches, T).swapaxes(0, 1),  # [M, B/M, T]
                replay.reshape(replay.shape[0] // microbatches, microbatches, T).swapaxes(0, 1),
            )  # [M, R/M, T]

        def body(acc, xs):
            return jax.tree.map(jnp.add, acc, value_and_grad(trainable, ctx, *xs)), None

        shapes = jax.eval_shape(value_and_grad, trainable, ctx, slices[0][0], slices[1][0])
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zero, slices)
        return jax.tree.map(lambda x: x / microbatches, total)

    def step(trainable, opt_state, ctx, new, replay):
        (_, (loss, reg_value)), g = grads(trainable, ctx, new, replay)
        with THIRD_PARTY_PROMOTION:  # optax's Adam adds Python floats to its int32 step count
            updates, opt_state = optimizer.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, {"ntp": loss, "reg": reg_value}

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, None))


def auto_microbatches(batch_size: int, T: int, rows: int = 0, replay_rows: int = 0, devices: int = 1) -> int:
    """Gradient-accumulation slices: `batch_size / rows` if rows is set; else on a CPU the largest
    count with >= 512 tokens per slice that divides the batch (and the replay batch); 1 on
    accelerators and on a mesh of `devices` > 1."""
    if rows:
        count = batch_size // rows
    elif runtime.platform() != "cpu" or devices > 1:
        count = 1
    else:
        per_slice = min(batch_size, max(1, math.ceil(512 / T)))
        while batch_size % per_slice:
            per_slice += 1
        count = batch_size // per_slice
    return math.gcd(count, replay_rows) if replay_rows else count
