"""Losses in float32: next-token prediction and forward KL(frozen || current).

Logits are [B, T, V]; tokens are [B, T]. Position t predicts token t+1, so the last position has
no target and is excluded. Per-position values are returned so callers can average any subset
(all positions, the second half of each row, ...).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def ntp_per_position(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Cross-entropy of each next token: logits [B, T, V], tokens [B, T] -> [B, T-1] float32."""
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    targets = tokens[:, 1:]  # [B, T-1]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def ntp_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token loss in nats/token (scalar float32)."""
    return jnp.mean(ntp_per_position(logits, tokens))


def kl_per_position(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """KL(p_teacher || p_student) over the full vocabulary at each position: [B, T, V] -> [B, T]."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def kl_loss(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """Mean forward KL in nats/token; the teacher is held constant (no gradient through it)."""
    return jnp.mean(kl_per_position(jax.lax.stop_gradient(teacher_logits), student_logits))


def chunk_rows() -> int:
    """Token rows per chunk of the fused unembedding + loss: small on CPU so that each chunk's
    [rows, V] logits stay in cache (measured 3.5x faster than materialising [B, T, V] at the
    tutorial size), large on accelerators where one big matmul is best."""
    return 512 if jax.default_backend() == "cpu" else 16384


def ntp_from_hidden(hidden: jax.Array, unembed: jax.Array, tokens: jax.Array) -> jax.Array:
    """Next-token loss per position without materialising [B, T, V] logits.

    hidden [B, T, D] (final-normed), unembed [D, V], tokens [B, T] -> [B, T-1] float32, equal to
    `ntp_per_position(hidden @ unembed, tokens)`. The positions are processed in chunks under
    `jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of storing them.
    """
    B, T, D = hidden.shape
    n = B * T
    rows = min(chunk_rows(), n)
    n_chunks = math.ceil(n / rows)
    pad = n_chunks * rows - n
    targets = jnp.roll(tokens, -1, axis=1).reshape(n)  # position t is scored against token t+1
    h = jnp.pad(hidden.reshape(n, D), ((0, pad), (0, 0))).reshape(n_chunks, rows, D)  # [C, R, D]
    targets = jnp.pad(targets, (0, pad)).reshape(n_chunks, rows)  # [C, R]

    @jax.checkpoint
    def chunk(_: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        h_c, t_c = xs
        logits = jnp.einsum("rd,dv->rv", h_c, unembed.astype(h_c.dtype),
                            preferred_element_type=jnp.float32)  # [R, V]
        target_logit = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]  # [R]
        return None, jax.nn.logsumexp(logits, axis=-1) - target_logit

    _, per = jax.lax.scan(chunk, None, (h, targets))  # [C, R]
    return per.reshape(-1)[:n].reshape(B, T)[:, :-1]  # [B, T-1]
