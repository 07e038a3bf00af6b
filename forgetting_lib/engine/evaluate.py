"""Evaluation as one jitted `lax.scan` over device-resident batches.

One forward pass per batch yields every metric we report: the mean next-token loss (`ntp`), the
loss on the second half of each row (`ntp_h2`, positions that see at least T/2 tokens of
context), the token accuracy (`acc`: the fraction of the loss's positions whose most likely next
token, the argmax, is the actual one, an exact tie counting as a hit; from the maximum logit the
loss's logsumexp takes anyway, so it costs no extra pass over the logits) and, when finetuning,
the KL from the frozen parent to the current model (`kl`).

The parent never changes and the eval rows are fixed, so its side of the KL is computed once per
run and eval set by `make_teacher_pass` (at the first evaluation, where the model is still the
parent, that pass is the evaluation itself) and kept in one of three forms, `TEACHER_FORMS`:
- "probs": the parent's next-token distribution, `CachedTeacher` [nb, Be, T, V] (4 V bytes per
  token): each later evaluation runs the student's forward only (0.47x the time of recomputing);
- "hidden": the parent's final hidden states [nb, Be, T, D] (4 D bytes per token), with its
  unembedding: the parent's trunk is skipped, its logits recomputed (0.66x);
- "params": nothing cached; the parent's whole forward runs at every evaluation.
`teacher_forms` picks the first that fits the run's memory bound (`log.teacher_cache_mb`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .losses import chunked_eval_stats, chunked_teacher

TEACHER_FORMS = ("probs", "hidden", "params")


def make_evaluator(hidden: Callable, teacher: str | None = None) -> Callable:
    """evaluate(params, teacher_in, tokens [nb, Be, T] int32, mask [nb, Be] f32) -> metrics (jitted).

    Metrics: {"ntp", "ntp_h2", "acc"} and, with a `teacher` form, "kl" = KL(teacher || params) per
    token. `teacher_in` is, per form: "params" the parent's parameters; "hidden" (hidden
    [nb, Be, T, D], unembed [D, V]); "probs" a CachedTeacher [nb, Be, T, V]; None without KL.
    """
    if teacher not in (None, *TEACHER_FORMS):
        raise ValueError(f"teacher form {teacher!r} is not one of {TEACHER_FORMS}")

    def evaluate(params: Any, teacher_in: Any, tokens: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
        per_batch = None if teacher in (None, "params") else teacher_in
        if teacher == "hidden":
            per_batch = teacher_in[0]  # [nb, Be, T, D]; the unembedding is shared

        def body(sums: jax.Array, xs: tuple[Any, ...]) -> tuple[jax.Array, None]:
            batch, m, ref = xs  # [Be, T], [Be], this batch's teacher (or None)
            if teacher == "params":
                ref = hidden(teacher_in, batch)
            elif teacher == "hidden":
                ref = (ref, teacher_in[1])
            # ntp, hit [Be, T-1]; kl [Be, T] (None without a teacher)
            ntp, kl, hit = chunked_eval_stats(*hidden(params, batch), batch, teacher=ref)
            return sums + _batch_sums(ntp, hit, m, kl), None

        n = 4 if teacher is None else 5
        sums, _ = jax.lax.scan(body, jnp.zeros(n, jnp.float32), (tokens, mask, per_batch))
        return _means(sums, teacher is not None)

    return jax.jit(evaluate)


def make_teacher_pass(hidden: Callable, form: str) -> Callable:
    """teacher_pass(teacher, tokens [nb, Be, T], mask [nb, Be]) -> (metrics, teacher_in) (jitted).

    One forward of the frozen parent over an eval set: its own {"ntp", "ntp_h2", "acc"} (so when the
    model being evaluated *is* the parent, this pass is its evaluation, with KL 0) and the cache
    of `form` ("probs" or "hidden") that `make_evaluator(hidden, form)` reads.
    """
    if form not in ("probs", "hidden"):
        raise ValueError(f"only 'probs' and 'hidden' are cached, not {form!r}")

    def teacher_pass(teacher: Any, tokens: jax.Array, mask: jax.Array) -> tuple[dict[str, jax.Array], Any]:
        def body(sums: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, Any]:
            batch, m = xs  # [Be, T], [Be]
            h, unembed = hidden(teacher, batch)  # [Be, T, D], [D, V]
            if form == "probs":
                ntp, hit, kept = chunked_teacher(h, unembed, batch)  # [Be, T-1] x2; [Be, T, V], [Be, T]
            else:
                ntp, _, hit = chunked_eval_stats(h, unembed, batch)  # [Be, T-1] x2
                kept = h
            return sums + _batch_sums(ntp, hit, m), kept

        sums, kept = jax.lax.scan(body, jnp.zeros(4, jnp.float32), (tokens, mask))
        unembed = hidden(teacher, tokens[0, :1])[1]  # the unembedding (XLA drops the unused trunk)
        return _means(sums, False), (kept if form == "probs" else (kept, unembed))

    return jax.jit(teacher_pass)


def teacher_forms(sets: dict[str, tuple[int, ...]], D: int, V: int, budget_mb: float) -> dict[str, str]:
    """The form of each eval set's cached parent ({name: "probs" | "hidden" | "params"}) for sets
    {name: tokens shape [nb, Be, T]}: in order, the first form that fits the memory left of
    `budget_mb` (probabilities 4 V bytes per token, hidden states 4 D bytes)."""
    left = budget_mb * 2**20
    forms = {}
    for name, shape in sets.items():
        tokens = math.prod(shape)
        for form, size in (("probs", 4 * (V + 1) * tokens), ("hidden", 4 * D * tokens), ("params", 0)):
            if size <= left:
                forms[name], left = form, left - size
                break
    return forms


def _batch_sums(ntp: jax.Array, hit: jax.Array, mask: jax.Array, kl: jax.Array | None = None) -> jax.Array:
    """Masked sums over a batch's rows: [ntp, ntp on the second half of each row, accuracy,
    (kl,) rows] from ntp and hit [Be, T-1], mask [Be] and kl [Be, T]; `_means` divides by the
    last."""
    T = ntp.shape[1] + 1
    per_row = [jnp.mean(ntp, axis=1), jnp.mean(ntp[:, T // 2 - 1 :], axis=1), jnp.mean(hit, axis=1)]  # [Be]
    if kl is not None:
        per_row.append(jnp.mean(kl, axis=1))
    return jnp.stack([jnp.sum(x * mask) for x in per_row] + [jnp.sum(mask)])


def _means(sums: jax.Array, with_kl: bool) -> dict[str, jax.Array]:
    out = {"ntp": sums[0] / sums[-1], "ntp_h2": sums[1] / sums[-1], "acc": sums[2] / sums[-1]}
    if with_kl:
        out["kl"] = sums[3] / sums[-1]
    return out


@jax.jit
def weight_norm(params: Any) -> jax.Array:
    """Global L2 norm of all parameters."""
    return optax.tree.norm(params)


@jax.jit
def distance(params: Any, reference: Any) -> jax.Array:
    """||params - reference|| over all parameters."""
    return optax.tree.norm(jax.tree.map(lambda a, b: a - b, params, reference))


@jax.jit
def identical(params: Any, reference: Any) -> jax.Array:
    """True when every parameter equals the reference's exactly (a model not yet trained)."""
    same = jax.tree.map(lambda a, b: jnp.all(a == b), params, reference)
    return jnp.all(jnp.stack(jax.tree.leaves(same)))
