"""Ancestral sampling with the KV cache: the paper's self-generated replay.

Shape glossary as in model.py (B batch rows, P prompt tokens, T = `length` tokens per output row,
V vocabulary). A row is its prompt followed by T - P tokens drawn one position at a time from the
full softmax of the frozen model at `temperature` (0 = greedy argmax; never top-k). The prompt is
prefilled in one `decode` call, then one compiled `fori_loop` samples and feeds back each token.

Replay never stops early: EOS may appear mid-row, as in packed training data. `stop_at_eos=True`
instead fills every position after a row's first EOS (prompt included) with `eos_id`; the tokens
up to that EOS are the same as without it, for the same key.

Randomness: the token at position t uses `fold_in(key, t)`, so a key fixes the rows.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .model import decode, init_cache, resolve_dtype

Sampler = Callable[[nnx.State, jax.Array, jax.Array], jax.Array]


def make_sampler(
    graphdef: nnx.GraphDef,
    *,
    length: int,
    temperature: float = 1.0,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
) -> Sampler:
    """sample(params, prompt [B, P] int32, key) -> tokens [B, length] int32, jitted once.

    Build it once per (graphdef, length, temperature, eos settings) and reuse it: each call with
    the same prompt shape and params structure runs the same compiled program.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if stop_at_eos and eos_id is None:
        raise ValueError("stop_at_eos=True needs an eos_id")

    def choose(logits: jax.Array, key: jax.Array, position: jax.Array) -> jax.Array:
        """Next token [B] from logits [B, V] f32 for the given output position."""
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        key = jax.random.fold_in(key, position)
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    def stop(token: jax.Array, done: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Replace tokens [B] of finished rows by EOS; rows are finished after their first EOS."""
        if not stop_at_eos:
            return token, done
        token = jnp.where(done, jnp.int32(eos_id), token)
        return token, done | (token == eos_id)

    @jax.jit
    def sample(params: nnx.State, prompt: jax.Array, key: jax.Array) -> jax.Array:
        B, P = prompt.shape
        if not 1 <= P <= length:
            raise ValueError(f"prompt length {P} must be in [1, length={length}]")
        prompt = prompt.astype(jnp.int32)
        tokens = jnp.zeros((B, length), jnp.int32).at[:, :P].set(prompt)  # [B, T]
        if P == length:
            return tokens
        params = _compute_copy(graphdef, params)
        cache = init_cache(graphdef, params, B, length)
        logits, cache = decode(graphdef, params, prompt, cache, 0)  # [B, P, V]
        done = jnp.any(prompt == eos_id, axis=1) if stop_at_eos else jnp.zeros((B,), bool)  # [B]

        def step(t, carry):  # sample position t from the logits at t - 1, then feed it back
            tokens, cache, logits, done = carry
            token, done = stop(choose(logits, key, t), done)  # [B]
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
            # At t = length - 1 this decode is unused: one extra step buys one traced body.
            logits, cache = decode(graphdef, params, token[:, None], cache, t)  # [B, 1, V]
            return tokens, cache, logits[:, 0], done

        carry = (tokens, cache, logits[:, -1], done)
        return jax.lax.fori_loop(P, length, step, carry)[0]

    return sample


def sample_from_id(
    sampler: Sampler, params: nnx.State, dataset_token: int, batch: int, key: jax.Array
) -> jax.Array:
    """Self-generated replay rows [batch, length]: prompt = the dataset-id token alone."""
    prompt = jnp.full((batch, 1), dataset_token, jnp.int32)  # [B, 1]
    return sampler(params, prompt, key)


def _compute_copy(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.State:
    """Params cast once to the activation dtype (the model casts them before every matmul
    anyway), so the decode loop does not re-cast every weight at every position."""
    dtype = resolve_dtype(nnx.merge(graphdef, params).cfg.dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
