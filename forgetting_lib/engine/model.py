"""Decoder-only pre-norm transformer (the paper's architecture) in Flax NNX, with a KV cache.

Shape glossary (used in every einsum string and shape comment below):
    B  batch rows            T  sequence length (positions in this call)
    S  key positions (T in a full forward, the cache length when decoding)
    D  model width           N  attention heads (N = D // H)
    H  head *dimension*      F  MLP hidden width (F = 4 D)
    V  vocabulary size       L  number of blocks
Note: `H` is the head dimension, not the number of heads.

Architecture: RMSNorm without gain before attention and MLP and before the unembedding; QK-norm
(RMSNorm of queries and keys per head); RoPE with base 10,000; GELU MLP; no biases; untied input
and output embeddings. Init: N(0, D^-1/2) everywhere except the MLP down-projection, N(0, F^-1/2).
Dtype policy: parameters are float32; matmuls run in the activation dtype; norm statistics,
softmax and everything a loss sees are float32.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .. import runtime
from ..config import ModelConfig
from .sharding import constrain_rows

Cache = list[dict[str, jax.Array]]  # per block: {"k": [B, N, S, H], "v": [B, N, S, H]}
Forward = Callable[[nnx.State, jax.Array], jax.Array]


def resolve_dtype(name: str) -> jnp.dtype:
    """`auto` = bfloat16 on accelerators, float32 on CPU (measured: benchmarks/train_throughput.py)."""
    if name == "auto":
        name = "float32" if runtime.platform() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm without gain over the last axis; statistics in float32, output in x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding on x [B, T, N, H] at integer positions [T] (rotate-half form)."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, H/2]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]  # [1, T, 1, H/2]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


class Block(nnx.Module):
    """Pre-norm block: x + Attn(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, D: int, H: int, *, rngs: nnx.Rngs):
        N, F = D // H, 4 * D
        self.qkv = nnx.Param(_normal(rngs.params(), (D, 3, N, H), D**-0.5))
        self.out = nnx.Param(_normal(rngs.params(), (N, H, D), D**-0.5))
        self.up = nnx.Param(_normal(rngs.params(), (D, F), D**-0.5))
        self.down = nnx.Param(_normal(rngs.params(), (F, D), F**-0.5))

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: dict[str, jax.Array] | None, start: jax.Array | int
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        dtype = x.dtype
        qkv = jnp.einsum("btd,dsnh->btsnh", rms_norm(x), self.qkv[...].astype(dtype))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, N, H]
        q, k = rope(rms_norm(q), positions), rope(rms_norm(k), positions)
        if cache is None:
            k_layout = "bsnh"
        else:  # cache layout [B, N, S, H]: attention reads it without transposing the whole cache
            k_layout = "bnsh"
            at = (0, 0, start, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.transpose(0, 2, 1, 3).astype(cache["k"].dtype), at)
            v = jax.lax.dynamic_update_slice(cache["v"], v.transpose(0, 2, 1, 3).astype(cache["v"].dtype), at)
            cache = {"k": k, "v": v}
        key_positions = jnp.arange(k.shape[k_layout.index("s")])  # [S]
        scores = jnp.einsum(f"btnh,{k_layout}->bnts", q, k.astype(dtype), preferred_element_type=jnp.float32)
        scores = scores * (q.shape[-1] ** -0.5)
        causal = key_positions[None, :] <= positions[:, None]  # [T, S]
        scores = jnp.where(causal[None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, N, T, S]
        attn = jnp.einsum(f"bnts,{k_layout}->btnh", probs, v.astype(dtype))
        x = x + jnp.einsum("btnh,nhd->btd", attn, self.out[...].astype(dtype))
        h = jax.nn.gelu(jnp.einsum("btd,df->btf", rms_norm(x), self.up[...].astype(dtype)))
        x = x + jnp.einsum("btf,fd->btd", h, self.down[...].astype(dtype))
        return x, cache


def _run_block(block: Block, *args: Any) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    return block(*args)


_run_block_remat = nnx.remat(_run_block)


class Transformer(nnx.Module):
    """Token ids [B, T] -> logits [B, T, V] (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = resolve_dtype(cfg.dtype)
        self.embed = nnx.Param(_normal(rngs.params(), (cfg.V, cfg.D), cfg.D**-0.5))
        self.blocks = nnx.List([Block(cfg.D, cfg.H, rngs=rngs) for _ in range(cfg.L)])
        self.unembed = nnx.Param(_normal(rngs.params(), (cfg.D, cfg.V), cfg.D**-0.5))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        logits, _ = self.decode(tokens, None, 0)
        return logits

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final-normed hidden states [B, T, D] (activation dtype), before the unembedding."""
        x, _ = self._trunk(tokens, None, 0)
        return x

    def decode(
        self, tokens: jax.Array, cache: Cache | None, start: jax.Array | int
    ) -> tuple[jax.Array, Cache | None]:
        """Logits for tokens [B, T] at positions start..start+T-1, reading/writing `cache`."""
        x, new_cache = self._trunk(tokens, cache, start)
        logits = jnp.einsum(
            "btd,dv->btv", x, self.unembed[...].astype(self.dtype), preferred_element_type=jnp.float32
        )
        return logits, new_cache

    def _trunk(
        self, tokens: jax.Array, cache: Cache | None, start: jax.Array | int
    ) -> tuple[jax.Array, Cache | None]:
        positions = start + jnp.arange(tokens.shape[1])  # [T]
        x = constrain_rows(self.embed[...].astype(self.dtype)[tokens])  # [B, T, D], rows split on a mesh
        new_cache: Cache | None = [] if cache is not None else None
        run_block = _run_block_remat if self.cfg.remat and cache is None else _run_block
        for i, block in enumerate(self.blocks):
            x, c = run_block(block, x, positions, None if cache is None else cache[i], start)
            x = constrain_rows(x)
            if new_cache is not None:
                new_cache.append(c)
        return rms_norm(x), new_cache

    def init_cache(self, batch: int, length: int) -> Cache:
        """Empty KV cache for `batch` rows of up to `length` positions."""
        N = self.cfg.D // self.cfg.H
        shape = (batch, N, length, self.cfg.H)  # [B, N, S, H]
        return [
            {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in range(self.cfg.L)
        ]


def init_model(cfg: ModelConfig, *, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """A freshly initialised model, split into its static graph and its parameter pytree.

    The initialisation is one compiled program (cached across processes): drawing the ~40
    parameter arrays op by op compiled each draw apart, ~2 s of every run's start on a CPU."""
    return abstract_params(cfg)[0], _init_params(cfg, key)


@partial(jax.jit, static_argnums=0)
def _init_params(cfg: ModelConfig, key: jax.Array) -> nnx.State:
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=key)))[1]


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and parameter shapes without allocating (used to restore checkpoints)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0))))


def make_forward(graphdef: nnx.GraphDef) -> Forward:
    """forward(params, tokens [B, T]) -> logits [B, T, V] f32; build once and reuse (jit-stable)."""
    return partial(_apply, graphdef)


def make_hidden(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], tuple[jax.Array, jax.Array]]:
    """hidden(params, tokens [B, T]) -> (final hidden [B, T, D], unembedding [D, V]); for fused losses."""
    return partial(_hidden, graphdef)


def _hidden(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, params)
    return model.hidden(tokens), model.unembed[...]


def _apply(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(tokens)


def decode(
    graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, cache: Cache, start: jax.Array | int
) -> tuple[jax.Array, Cache]:
    """One KV-cache step: logits [B, T, V] for tokens [B, T] placed at `start`, and the new cache."""
    logits, cache = nnx.merge(graphdef, params).decode(tokens, cache, start)
    return logits, cache


def init_cache(graphdef: nnx.GraphDef, params: nnx.State, batch: int, length: int) -> Cache:
    return nnx.merge(graphdef, params).init_cache(batch, length)


def kv_cache_bytes(cfg: ModelConfig, length: int) -> int:
    """Bytes of one row's KV cache over `length` positions (keys and values of every block)."""
    return 2 * cfg.L * length * cfg.D * resolve_dtype(cfg.dtype).itemsize


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def param_formula(cfg: ModelConfig) -> int:
    """12 L D^2 + 2 D V: parameters of this architecture (both embedding matrices counted)."""
    return 12 * cfg.L * cfg.D**2 + 2 * cfg.D * cfg.V


def paper_param_count(cfg: ModelConfig) -> int:
    """N = 12 L D^2 + D V: the paper's count for tokens-per-parameter (one embedding counted)."""
    return 12 * cfg.L * cfg.D**2 + cfg.D * cfg.V


def flops_per_token(cfg: ModelConfig, T: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul parameter, plus attention's
    QK^T and PV products, 12 L T D, counted over all T keys as computed (the usual MFU count)."""
    matmul_params = 12 * cfg.L * cfg.D**2 + cfg.D * cfg.V
    return 6.0 * matmul_params + 12.0 * cfg.L * T * cfg.D
