"""Decoder-only pre-norm transformer (the paper's architecture, and the Llama family's) in Flax
NNX, with a KV cache.

Shape glossary (used in every einsum string and shape comment below):
    B  batch rows            T  sequence length (positions in this call)
    S  key positions (T in a full forward, the cache length when decoding)
    D  model width           N  attention heads (D // H unless model.heads is set)
    H  head *dimension*      K  key/value heads (N, or fewer: grouped-query attention)
    G  query heads per key/value head (N // K)
    F  MLP hidden width (4 D unless model.F is set)
    V  vocabulary size       L  number of blocks
Note: `H` is the head dimension, not the number of heads.

The paper's architecture (the defaults of `ModelConfig`): RMSNorm without gain before attention
and MLP and before the unembedding; QK-norm (RMSNorm of queries and keys per head); RoPE with
base 10,000; GELU MLP; no biases; untied input and output embeddings. Init: N(0, D^-1/2)
everywhere except the MLP down-projection, N(0, F^-1/2).
The Llama family (Llama 3, Qwen2/3, Mistral, SmolLM2, Apertus; engine/hf.py maps their weights)
varies it through `ModelConfig`: norm gains, SwiGLU MLP, grouped-query attention, q/k/v biases,
no QK-norm, tied embeddings, RoPE base and Llama 3 frequency scaling.
Parameter names (per block): `qkv` [D, 3, N, H] when K = N, else `q` [D, N, H] and `kv`
[D, 2, K, H]; `out` [N, H, D]; `up` [D, F], `down` [F, D], and `gate` [D, F] for SwiGLU;
optional `qkv_bias` [3, N, H] or `q_bias` [N, H] + `kv_bias` [2, K, H]; gains `attn_norm`,
`mlp_norm` [D], `q_norm`, `k_norm` [H]. Model: `embed` [V, D], `unembed` [D, V] unless tied,
`final_norm` [D] with gains.
Dtype policy: parameters are float32 (or model.param_dtype); matmuls run in the activation dtype;
norm statistics, softmax and everything a loss sees are float32.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .. import runtime
from ..config import ModelConfig
from .sharding import constrain_rows

Cache = list[dict[str, jax.Array]]  # per block: {"k": [B, K, S, H], "v": [B, K, S, H]}
Forward = Callable[[nnx.State, jax.Array], jax.Array]


def resolve_dtype(name: str) -> jnp.dtype:
    """`auto` = bfloat16 on accelerators, float32 on CPU (measured: benchmarks/train_throughput.py)."""
    if name == "auto":
        name = "float32" if runtime.platform() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def heads(cfg: ModelConfig) -> tuple[int, int]:
    """(N attention heads, K key/value heads) of a config."""
    n = cfg.heads or cfg.D // cfg.H
    return n, cfg.kv_heads or n


def mlp_width(cfg: ModelConfig) -> int:
    return cfg.F or 4 * cfg.D


def rms_norm(x: jax.Array, eps: float = 1e-6, gain: jax.Array | None = None) -> jax.Array:
    """RMSNorm over the last axis (times `gain` if given); statistics in float32, output in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if gain is None else y * gain.astype(x.dtype)[(None,) * (y.ndim - 1)]  # [..., D] x [1.., D]


def rope_frequencies(cfg: ModelConfig, H: int) -> jax.Array:
    """Inverse wavelengths [H/2] of RoPE, with Llama 3's scaling of the low frequencies when
    model.rope_factor != 1 (wavelengths above original_len / low_freq divided by the factor, below
    original_len / high_freq kept, linearly blended in between)."""
    half = H // 2
    freqs = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    if cfg.rope_factor == 1.0:
        return freqs
    wavelength = 2 * math.pi / freqs
    n, lo, hi = cfg.rope_original_len, cfg.rope_low_freq, cfg.rope_high_freq
    low, high = n / lo, n / hi
    blend = (n / wavelength - lo) / (hi - lo)
    smoothed = (1 - blend) * freqs / cfg.rope_factor + blend * freqs
    return jnp.where(wavelength > low, freqs / cfg.rope_factor, jnp.where(wavelength < high, freqs, smoothed))


def rope(x: jax.Array, positions: jax.Array, freqs: jax.Array) -> jax.Array:
    """Rotary position embedding on x [B, T, N, H] at integer positions [T] (rotate-half form)."""
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, H/2]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]  # [1, T, 1, H/2]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(key, shape, jnp.float32)


class Block(nnx.Module):
    """Pre-norm block: x + Attn(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, F = cfg.D, cfg.H, mlp_width(cfg)
        N, K = heads(cfg)
        self.cfg = cfg
        if K == N:
            self.qkv = nnx.Param(_normal(rngs.params(), (D, 3, N, H), D**-0.5))
        else:
            self.q = nnx.Param(_normal(rngs.params(), (D, N, H), D**-0.5))
            self.kv = nnx.Param(_normal(rngs.params(), (D, 2, K, H), D**-0.5))
        self.out = nnx.Param(_normal(rngs.params(), (N, H, D), D**-0.5))
        if cfg.mlp == "swiglu":
            self.gate = nnx.Param(_normal(rngs.params(), (D, F), D**-0.5))
        self.up = nnx.Param(_normal(rngs.params(), (D, F), D**-0.5))
        self.down = nnx.Param(_normal(rngs.params(), (F, D), F**-0.5))
        if cfg.qkv_bias:
            if K == N:
                self.qkv_bias = nnx.Param(jnp.zeros((3, N, H), jnp.float32))
            else:
                self.q_bias = nnx.Param(jnp.zeros((N, H), jnp.float32))
                self.kv_bias = nnx.Param(jnp.zeros((2, K, H), jnp.float32))
        if cfg.norm_gain:
            self.attn_norm = nnx.Param(jnp.ones((D,), jnp.float32))
            self.mlp_norm = nnx.Param(jnp.ones((D,), jnp.float32))
            if cfg.qk_norm:
                self.q_norm = nnx.Param(jnp.ones((H,), jnp.float32))
                self.k_norm = nnx.Param(jnp.ones((H,), jnp.float32))

    def _gain(self, name: str) -> jax.Array | None:
        return getattr(self, name)[...] if self.cfg.norm_gain else None

    def _qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, T, N, H], keys and values [B, T, K, H] of the normed stream h [B, T, D]."""
        dtype = h.dtype
        if hasattr(self, "qkv"):
            qkv = jnp.einsum("btd,dsnh->btsnh", h, self.qkv[...].astype(dtype))
            if self.cfg.qkv_bias:
                qkv = qkv + self.qkv_bias[...].astype(dtype)[None, None]  # [B, T, 3, N, H]
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = jnp.einsum("btd,dnh->btnh", h, self.q[...].astype(dtype))
        kv = jnp.einsum("btd,dskh->btskh", h, self.kv[...].astype(dtype))
        if self.cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dtype)[None, None]  # [B, T, N, H]
            kv = kv + self.kv_bias[...].astype(dtype)[None, None]  # [B, T, 2, K, H]
        return q, kv[:, :, 0], kv[:, :, 1]

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: dict[str, jax.Array] | None, start: jax.Array | int
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        dtype, cfg = x.dtype, self.cfg
        q, k, v = self._qkv(rms_norm(x, cfg.norm_eps, self._gain("attn_norm")))
        if cfg.qk_norm:
            q = rms_norm(q, cfg.norm_eps, self._gain("q_norm"))
            k = rms_norm(k, cfg.norm_eps, self._gain("k_norm"))
        freqs = rope_frequencies(cfg, q.shape[-1])
        q, k = rope(q, positions, freqs), rope(k, positions, freqs)
        if cache is None:
            k_layout = "bsnh"
        else:  # cache layout [B, K, S, H]: attention reads it without transposing the whole cache
            k_layout = "bnsh"
            at = (0, 0, start, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.transpose(0, 2, 1, 3).astype(cache["k"].dtype), at)
            v = jax.lax.dynamic_update_slice(cache["v"], v.transpose(0, 2, 1, 3).astype(cache["v"].dtype), at)
            cache = {"k": k, "v": v}
        S = k.shape[k_layout.index("s")]
        N, K = q.shape[2], k.shape[k_layout.index("n")]
        key_positions = jnp.arange(S)  # [S]
        causal = key_positions[None, :] <= positions[:, None]  # [T, S]
        if cfg.window:
            causal = causal & (key_positions[None, :] > positions[:, None] - cfg.window)
        if K == N:
            scores = jnp.einsum(
                f"btnh,{k_layout}->bnts", q, k.astype(dtype), preferred_element_type=jnp.float32
            )
        else:  # grouped-query attention: query head n = k G + g reads key/value head k
            qg = q.reshape(*q.shape[:2], K, N // K, q.shape[-1])  # [B, T, K, G, H]
            kg = k_layout.replace("n", "k")
            scores = jnp.einsum(f"btkgh,{kg}->bkgts", qg, k.astype(dtype), preferred_element_type=jnp.float32)
            scores = scores.reshape(scores.shape[0], N, *scores.shape[3:])  # [B, N, T, S]
        scores = scores * (q.shape[-1] ** -0.5)
        scores = jnp.where(causal[None, None], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, N, T, S]
        if K == N:
            attn = jnp.einsum(f"bnts,{k_layout}->btnh", probs, v.astype(dtype))
        else:
            pg = probs.reshape(probs.shape[0], K, N // K, *probs.shape[2:])  # [B, K, G, T, S]
            attn = jnp.einsum(f"bkgts,{kg}->btkgh", pg, v.astype(dtype))
            attn = attn.reshape(*attn.shape[:2], N, attn.shape[-1])  # [B, T, N, H]
        x = x + jnp.einsum("btnh,nhd->btd", attn, self.out[...].astype(dtype))
        h = rms_norm(x, cfg.norm_eps, self._gain("mlp_norm"))
        up = jnp.einsum("btd,df->btf", h, self.up[...].astype(dtype))
        if cfg.mlp == "swiglu":
            act = jax.nn.silu(jnp.einsum("btd,df->btf", h, self.gate[...].astype(dtype))) * up
        else:
            act = jax.nn.gelu(up)
        x = x + jnp.einsum("btf,fd->btd", act, self.down[...].astype(dtype))
        return x, cache


def _run_block(block: Block, *args: Any) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    return block(*args)


def _run_block_remat(block: Block, *args: Any) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """`_run_block` recomputed in the backward pass: jax.checkpoint of a pure function of the
    block's parameters (nnx.remat fails when the model is merged inside a scan, as the
    evaluator's is: "Cannot mutate Param from a different trace level")."""
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


class Transformer(nnx.Module):
    """Token ids [B, T] -> logits [B, T, V] (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = resolve_dtype(cfg.dtype)
        self.embed = nnx.Param(_normal(rngs.params(), (cfg.V, cfg.D), cfg.D**-0.5))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.L)])
        if not cfg.tie_embed:
            self.unembed = nnx.Param(_normal(rngs.params(), (cfg.D, cfg.V), cfg.D**-0.5))
        if cfg.norm_gain:
            self.final_norm = nnx.Param(jnp.ones((cfg.D,), jnp.float32))

    def unembedding(self) -> jax.Array:
        """The output projection [D, V] (the input embedding's transpose when tied)."""
        return self.embed[...].T if self.cfg.tie_embed else self.unembed[...]

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
            "btd,dv->btv", x, self.unembedding().astype(self.dtype), preferred_element_type=jnp.float32
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
        gain = self.final_norm[...] if self.cfg.norm_gain else None
        return rms_norm(x, self.cfg.norm_eps, gain), new_cache

    def init_cache(self, batch: int, length: int) -> Cache:
        """Empty KV cache for `batch` rows of up to `length` positions."""
        shape = (batch, heads(self.cfg)[1], length, self.cfg.H)  # [B, K, S, H]
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
    return to_param_dtype(cfg, nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=key)))[1])


def to_param_dtype(cfg: ModelConfig, params: Any) -> Any:
    """`params` stored in model.param_dtype (initialisation draws in float32)."""
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda x: x.astype(dtype), params)


def abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and parameter shapes without allocating (used to restore checkpoints)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0))))
    dtype = jnp.dtype(cfg.param_dtype)
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), state)


def make_forward(graphdef: nnx.GraphDef) -> Forward:
    """forward(params, tokens [B, T]) -> logits [B, T, V] f32; build once and reuse (jit-stable)."""
    return partial(_apply, graphdef)


def make_hidden(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], tuple[jax.Array, jax.Array]]:
    """hidden(params, tokens [B, T]) -> (final hidden [B, T, D], unembedding [D, V]); for fused losses."""
    return partial(_hidden, graphdef)


def _hidden(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, params)
    return model.hidden(tokens), model.unembedding()


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
    return 2 * cfg.L * length * heads(cfg)[1] * cfg.H * resolve_dtype(cfg.dtype).itemsize


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def block_matrix_params(cfg: ModelConfig) -> int:
    """Weights of one block's matrices: attention (N + 2 K) H D + N H D, MLP (2 or 3) D F
    (4 D^2 + 8 D^2 = 12 D^2 for the paper's architecture)."""
    N, K = heads(cfg)
    return (2 * N + 2 * K) * cfg.H * cfg.D + (3 if cfg.mlp == "swiglu" else 2) * cfg.D * mlp_width(cfg)


def param_formula(cfg: ModelConfig) -> int:
    """Parameters of this architecture (12 L D^2 + 2 D V for the paper's: both embedding
    matrices counted; one when tied; biases and norm gains included where present)."""
    N, K = heads(cfg)
    per_block = block_matrix_params(cfg)
    per_block += (N + 2 * K) * cfg.H if cfg.qkv_bias else 0
    per_block += (2 * cfg.D + (2 * cfg.H if cfg.qk_norm else 0)) if cfg.norm_gain else 0
    embeddings = (1 if cfg.tie_embed else 2) * cfg.D * cfg.V
    return cfg.L * per_block + embeddings + (cfg.D if cfg.norm_gain else 0)


def paper_param_count(cfg: ModelConfig) -> int:
    """N = 12 L D^2 + D V: the paper's count for tokens-per-parameter (the blocks' matrices and one
    embedding; `block_matrix_params` per block for other architectures)."""
    return cfg.L * block_matrix_params(cfg) + cfg.D * cfg.V


def flops_per_token(cfg: ModelConfig, T: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul parameter, plus attention's
    QK^T and PV products, 12 L T N H, counted over all T keys as computed (the usual MFU count)."""
    return 6.0 * paper_param_count(cfg) + 12.0 * cfg.L * T * heads(cfg)[0] * cfg.H
