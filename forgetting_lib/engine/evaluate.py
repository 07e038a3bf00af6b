"""Evaluation as one jitted `lax.scan` over device-resident batches.

One forward pass per batch yields every loss we report: the mean next-token loss (`ntp`), the
loss on the second half of each row (`ntp_h2`, positions that see at least T/2 tokens of
context), and, when finetuning, the KL from the frozen parent to the current model (`kl`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .losses import chunked_stats


def make_evaluator(hidden: Callable, with_teacher: bool = False) -> Callable:
    """evaluate(params, teacher, tokens [nb, Be, T] int32, mask [nb, Be] f32) -> metrics (jitted).

    Metrics: {"ntp", "ntp_h2"} and, if `with_teacher`, "kl" = KL(teacher || params) per token.
    Pass teacher=None when `with_teacher` is False.
    """

    def evaluate(params: Any, teacher: Any, tokens: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        T = tokens.shape[-1]

        def body(sums: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            batch, m = xs  # [Be, T], [Be]
            ref = hidden(teacher, batch) if with_teacher else None
            ntp, kl = chunked_stats(*hidden(params, batch), batch, teacher=ref)  # [Be, T-1], [Be, T]
            per_row = [jnp.mean(ntp, axis=1), jnp.mean(ntp[:, T // 2 - 1 :], axis=1)]  # [Be] each
            if with_teacher:
                per_row.append(jnp.mean(kl, axis=1))
            return sums + jnp.stack([jnp.sum(x * m) for x in per_row] + [jnp.sum(m)]), None

        sums, _ = jax.lax.scan(body, jnp.zeros(4 if with_teacher else 3, jnp.float32), (tokens, mask))
        out = {"ntp": sums[0] / sums[-1], "ntp_h2": sums[1] / sums[-1]}
        if with_teacher:
            out["kl"] = sums[2] / sums[-1]
        return out

    return jax.jit(evaluate)


@jax.jit
def weight_norm(params: Any) -> jax.Array:
    """Global L2 norm of all parameters."""
    return optax.tree.norm(params)


@jax.jit
def distance(params: Any, reference: Any) -> jax.Array:
    """||params - reference|| over all parameters."""
    return optax.tree.norm(jax.tree.map(lambda a, b: a - b, params, reference))
