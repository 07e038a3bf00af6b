"""Ancestral sampling with the KV cache: the paper's self-generated replay.

Shape glossary as in model.py (B batch rows, P prompt tokens, T = `length` tokens per output row,
V vocabulary, G key groups). A row is its prompt followed by T - P tokens drawn one position at a
time from the full softmax of the frozen model at `temperature` (0 = greedy argmax; never top-k);
`top_p` < 1 samples from the nucleus instead (the fewest most likely tokens holding that much of
the probability, renormalised; an ablation, not the paper's setting).
The prompt is prefilled in one `decode` call, then compiled `fori_loop`s sample and feed back each
token.

Replay never stops early: EOS may appear mid-row, as in packed training data. `stop_at_eos=True`
instead fills every position after a row's first EOS (prompt included) with `eos_id`; the tokens
up to that EOS are the same as without it, for the same key.

Speed (benchmarks/sampling.py), without changing the distribution sampled:
- a token is drawn by inverting the softmax's CDF with one uniform number per row, exact for the
  categorical distribution; `jax.random.categorical` draws V Gumbel numbers per row instead,
  which took 40% of the tutorial model's sampling time on a CPU;
- the positions are decoded in `SEGMENTS` loops whose KV cache grows between them, so position t
  reads at most the cache up to its segment's end rather than all T positions (reading the cache
  is memory-bound: 0.625x the cache traffic with 4 segments).

Randomness: `key` is one key, or G keys [G] that split the B rows into G equal groups. The token
at position t of row r in a group uses `fold_in(group key, t)`'s r-th uniform, so rows depend only
on their group's key and their index in it: G groups sampled in one call equal G calls of B / G
rows (used to sample many replay chunks at once).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import decode, init_cache, resolve_dtype

Sampler = Callable[[nnx.State, jax.Array, jax.Array], jax.Array]

SEGMENTS = 4  # decode loops per call; each one is compiled, so more segments compile longer


def make_sampler(
    graphdef: nnx.GraphDef,
    *,
    length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    stop_at_eos: bool = False,
) -> Sampler:
    """sample(params, prompt [B, P] int32, key [] or [G]) -> tokens [B, length] int32, jitted once.

    Build it once per (graphdef, length, temperature, top_p, eos settings) and reuse it: each call with
    the same prompt and key shapes and params structure runs the same compiled program.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if stop_at_eos and eos_id is None:
        raise ValueError("stop_at_eos=True needs an eos_id")

    def choose(logits: jax.Array, keys: jax.Array, position: jax.Array) -> jax.Array:
        """Next token [B] from logits [B, V] f32 for the given output position; keys [G]."""
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        rows = logits.shape[0] // keys.shape[0]
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, position), (rows,)))(keys)
        logits = logits / temperature
        return inverse_cdf(nucleus(logits, top_p) if top_p < 1 else logits, u.reshape(-1))

    def stop(token: jax.Array, done: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Replace tokens [B] of finished rows by EOS; rows are finished after their first EOS."""
        if not stop_at_eos:
            return token, done
        token = jnp.where(done, jnp.int32(eos_id), token)
        return token, done | (token == eos_id)

    @jax.jit
    def sample(params: nnx.State, prompt: jax.Array, key: jax.Array) -> jax.Array:
        B, P = prompt.shape
        keys = key.reshape(-1)  # [G]
        if not 1 <= P <= length:
            raise ValueError(f"prompt length {P} must be in [1, length={length}]")
        if B % keys.shape[0]:
            raise ValueError(f"{B} prompt rows do not split into {keys.shape[0]} equal key groups")
        prompt = prompt.astype(jnp.int32)
        tokens = jnp.zeros((B, length), jnp.int32).at[:, :P].set(prompt)  # [B, T]
        if P == length:
            return tokens
        params = _compute_copy(graphdef, params)
        ends = segment_ends(P, length)
        cache = init_cache(graphdef, params, B, ends[0])  # [B, N, S, H] per block, S = ends[0]
        logits, cache = decode(graphdef, params, prompt, cache, 0)  # [B, P, V]
        done = jnp.any(prompt == eos_id, axis=1) if stop_at_eos else jnp.zeros((B,), bool)  # [B]

        def step(t, carry):  # sample position t from the logits at t - 1, then feed it back
            tokens, cache, logits, done = carry
            token, done = stop(choose(logits, keys, t), done)  # [B]
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
            # At t = length - 1 this decode is unused: one extra step buys one traced body.
            logits, cache = decode(graphdef, params, token[:, None], cache, t)  # [B, 1, V]
            return tokens, cache, logits[:, 0], done

        carry, start = (tokens, cache, logits[:, -1], done), P
        for end in ends:  # positions start..end-1 read and write a cache of `end` positions
            carry = (carry[0], _grow(carry[1], end), *carry[2:])
            carry = jax.lax.fori_loop(start, end, step, carry)
            start = end
        return carry[0]

    return sample


def inverse_cdf(logits: jax.Array, u: jax.Array) -> jax.Array:
    """Tokens [B] int32 drawn from softmax(logits [B, V]) by the uniforms u [B] in [0, 1).

    Token v is chosen when u falls in its slice [C(v-1), C(v)) of the cumulative distribution, so
    P(v) = softmax(logits)_v exactly, up to float32 rounding of the cumulative sums (~1e-7).
    """
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V], max entry 1
    cdf = jnp.cumsum(weights, axis=-1)  # [B, V]
    # the draw, kept below the total (u * total may round up to it): then some entry with weight
    # > 0 lies above it, so `below` never reaches the zero-weight tokens after the last such one
    draw = jnp.minimum(u * cdf[:, -1], jnp.nextafter(cdf[:, -1], jnp.zeros_like(cdf[:, -1])))  # [B]
    # [B]: entries at or below the draw; a token of weight 0 has an empty slice, never chosen
    below = jnp.sum(cdf <= draw[:, None], axis=-1)
    return below.astype(jnp.int32)


def nucleus(logits: jax.Array, top_p: float, iterations: int = 30) -> jax.Array:
    """logits [B, V] with every token outside the nucleus set to -inf: the nucleus is the fewest
    most likely tokens whose probabilities sum to at least `top_p` (the most likely token always
    stays).

    The nucleus is {v : p_v >= tau} for the largest tau whose set still holds `top_p`; tau is
    found by bisection (`iterations` halvings of [0, max p], each one compare-and-sum over V): on a
    CPU top-p sampling then takes 1.1-1.5x the full softmax's time (`benchmarks/sampling.py
    --top-p 1.0,0.8`), where sorting V logits per position took 9x. A token is misplaced only if its
    probability lies within max p / 2^iterations below tau (a near-tie with the last one kept).
    """
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    top = jnp.max(probs, axis=-1)  # [B]

    def mass(tau: jax.Array) -> jax.Array:  # [B]: probability held by the tokens with p >= tau
        return jnp.sum(jnp.where(probs >= tau[:, None], probs, 0.0), axis=-1)

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds  # invariant: mass(lo) >= top_p
        mid = 0.5 * (lo + hi)
        enough = mass(mid) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros_like(top), top))
    lo = jnp.where(mass(top) >= top_p, top, lo)  # the top token alone may hold enough
    return jnp.where(probs >= lo[:, None], logits, -jnp.inf)


def segment_ends(start: int, length: int, segments: int = SEGMENTS) -> list[int]:
    """Cache lengths of the decode loops: `segments` equal steps up to `length`, the first one
    holding the prompt (positions < start)."""
    ends = [max(start, -(-length * i // segments)) for i in range(1, segments + 1)]
    return sorted(set(ends))


def _grow(cache: list[dict[str, jax.Array]], length: int) -> list[dict[str, jax.Array]]:
    """The cache [B, N, S, H] zero-padded to `length` positions (one copy per segment)."""
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))  # noqa: E731
    return [{name: pad(x) for name, x in block.items()} for block in cache]


def prompt_ids(prompt: int | Sequence[int]) -> np.ndarray:
    """A prompt as ids [P] int32: one token (a dataset-id token, or BOS) or a sequence."""
    ids = np.atleast_1d(np.asarray(prompt, np.int32))
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"a prompt is one token id or a non-empty sequence of them, got {prompt!r}")
    return ids


def sample_from_id(
    sampler: Sampler, params: nnx.State, prompt: int | Sequence[int], batch: int, key: jax.Array
) -> jax.Array:
    """Self-generated replay rows [batch, length]: every row's prompt is the dataset-id token alone
    (or the given token sequence, e.g. a chat template's); `key` is one key, or G keys (G dividing
    `batch`) for G groups of rows sampled in one call."""
    ids = prompt_ids(prompt)
    return sampler(params, jnp.broadcast_to(jnp.asarray(ids), (batch, len(ids))), key)  # [B, P] prompt


def _compute_copy(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.State:
    """Params cast once to the activation dtype (the model casts them before every matmul
    anyway), so the decode loop does not re-cast every weight at every position."""
    dtype = resolve_dtype(nnx.merge(graphdef, params).cfg.dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
