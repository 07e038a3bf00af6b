"""Evaluation as one jitted `lax.scan` over device-resident batches.

One forward pass per batch yields every loss we report: the mean next-token loss (`ntp`) and the
loss on the second half of each row (`ntp_h2`, positions that see at least T/2 tokens of context).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .losses import ntp_from_hidden


def make_evaluator(hidden: Callable) -> Callable:
    """evaluate(params, tokens [nb, Be, T] int32, mask [nb, Be] f32) -> {"ntp", "ntp_h2"} (jitted)."""
    def evaluate(params: Any, tokens: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        T = tokens.shape[-1]

        def body(sums: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            batch, m = xs  # [Be, T], [Be]
            per = ntp_from_hidden(*hidden(params, batch), batch)  # [Be, T-1]
            row_ntp = jnp.mean(per, axis=1)  # [Be]
            row_h2 = jnp.mean(per[:, T // 2 - 1:], axis=1)  # [Be]: targets T/2 .. T-1
            return sums + jnp.stack([jnp.sum(row_ntp * m), jnp.sum(row_h2 * m), jnp.sum(m)]), None

        sums, _ = jax.lax.scan(body, jnp.zeros(3, jnp.float32), (tokens, mask))
        return {"ntp": sums[0] / sums[2], "ntp_h2": sums[1] / sums[2]}
    return jax.jit(evaluate)


@jax.jit
def weight_norm(params: Any) -> jax.Array:
    """Global L2 norm of all parameters."""
    return optax.global_norm(params)
