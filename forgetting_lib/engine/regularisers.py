"""The regulariser registry: every finetuning method (`reg.method`) in one table.

A run minimises NTP(new batch) + coeff x R. Each `Regulariser` says what R is (its `term`), what
the literature calls it, and what it needs: replay rows every step (`replay_rows`), the frozen
parent in the step (`frozen`), a diagonal Fisher (`fisher`), or a `coeff` that is a fraction of
the batch rather than a weight (`coeff_is_fraction`). Config validation, the train step, run
assembly, the explorer and the toy trainer all read `REGULARISERS`; adding a method is one entry
here plus its test.

A term takes a `TermInputs` and returns (the new batch's per-token NTP [b, T], R as a scalar); it
receives the new batch's final hidden states already computed, so a term that needs them (KL on
the new batch) reuses them, and one that does not simply returns `new_ntp(x)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .losses import kl_from_hidden, ntp_from_hidden

Hidden = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]  # (params, tokens) -> (h, W)


class TermInputs(NamedTuple):
    hidden: Hidden  # the model's forward up to the final hidden states
    params: Any  # the full parameters being trained (LoRA already merged)
    ctx: dict[str, Any]  # "frozen": the parent's params; "fisher": the diagonal Fisher
    new: jax.Array  # [b, T] new-task rows
    replay: jax.Array  # [r, T] old-distribution rows (r = 0 for methods without replay)
    h: jax.Array  # [b, T, D] the current model's final hidden states on `new`
    w: jax.Array  # [D, V] the unembedding


Term = Callable[[TermInputs], tuple[jax.Array, jax.Array]]  # -> (NTP [b, T], R [])


@dataclass(frozen=True)
class Regulariser:
    name: str  # the config value, reg.method=<name>
    literature: str  # what the literature calls it
    term: Term | None = None  # R; None: no extra loss term (coeff is not a loss weight)
    replay_rows: bool = False  # draws replay rows (real or self-generated) every step
    frozen: bool = False  # needs the frozen parent's params in the step
    fisher: bool = False  # needs a diagonal Fisher, estimated once on replay rows
    coeff_is_fraction: bool = False  # reg.coeff is the replaced fraction of each batch, in [0, 1)
    summary: str = ""  # R in one line, for tables and the README

    @property
    def needs_parent(self) -> bool:
        """Whether it regularises towards a parent (every method but plain finetuning does)."""
        return self.term is not None or self.replay_rows

    @property
    def uses_coeff(self) -> bool:
        """Whether reg.coeff means anything: a loss weight, or the replaced fraction."""
        return self.term is not None or self.coeff_is_fraction

    @property
    def needs_replay_source(self) -> bool:
        """Whether the run opens a replay source (rows every step, or rows for the Fisher)."""
        return self.replay_rows or self.fisher


def new_ntp(x: TermInputs) -> jax.Array:
    """The new batch's per-token NTP loss [b, T] from its precomputed hidden states."""
    return ntp_from_hidden(x.h, x.w, x.new)


def _kl_on_new(x: TermInputs) -> tuple[jax.Array, jax.Array]:
    ntp, kl = kl_from_hidden(x.hidden(x.ctx["frozen"], x.new), x.h, x.w, x.new)  # one fused pass
    return ntp, jnp.mean(kl)


def _ntp_on_replay(x: TermInputs) -> tuple[jax.Array, jax.Array]:
    ntp = new_ntp(x)
    return ntp, jnp.mean(ntp_from_hidden(*x.hidden(x.params, x.replay), x.replay))


def _kl_on_replay(x: TermInputs) -> tuple[jax.Array, jax.Array]:
    ntp = new_ntp(x)
    h_r, w_r = x.hidden(x.params, x.replay)
    return ntp, jnp.mean(kl_from_hidden(x.hidden(x.ctx["frozen"], x.replay), h_r, w_r, x.replay)[1])


def ewc_penalty(params: Any, anchor: Any, fisher: Any) -> jax.Array:
    """sum_i F_i (theta_i - pi_i)^2 over every parameter."""
    terms = jax.tree.map(lambda p, a, f: jnp.sum(f * (p - a) ** 2), params, anchor, fisher)
    return sum(jax.tree_util.tree_leaves(terms), jnp.zeros((), jnp.float32))


def l2sp_penalty(params: Any, anchor: Any) -> jax.Array:
    """||theta - pi||^2 over every parameter (the squared L2 distance to the starting point)."""
    terms = jax.tree.map(lambda p, a: jnp.sum(jnp.square(p - a)), params, anchor)
    return sum(jax.tree_util.tree_leaves(terms), jnp.zeros((), jnp.float32))


def _ewc(x: TermInputs) -> tuple[jax.Array, jax.Array]:
    return new_ntp(x), ewc_penalty(x.params, x.ctx["frozen"], x.ctx["fisher"])


def _l2sp(x: TermInputs) -> tuple[jax.Array, jax.Array]:
    return new_ntp(x), l2sp_penalty(x.params, x.ctx["frozen"])


REGULARISERS: dict[str, Regulariser] = {
    r.name: r
    for r in (
        Regulariser("none", "plain finetuning", summary="—"),
        Regulariser(
            "ntp_pre",
            "experience replay / rehearsal (generative replay when self-generated)",
            _ntp_on_replay,
            replay_rows=True,
            summary="next-token loss on replay rows",
        ),
        Regulariser(
            "kl_pre",
            "logit / dark-experience replay, distillation on old inputs",
            _kl_on_replay,
            replay_rows=True,
            frozen=True,
            summary="KL(parent ‖ current) on replay rows, full vocabulary",
        ),
        Regulariser(
            "kl_dwn",
            "Learning without Forgetting (Li & Hoiem 2016)",
            _kl_on_new,
            frozen=True,
            summary="KL(parent ‖ current) on the new batch",
        ),
        Regulariser(
            "replace",
            "experience replay at a fixed ratio",
            replay_rows=True,
            coeff_is_fraction=True,
            summary="none; ⌊coeff·B⌋ rows of each batch are replay rows",
        ),
        Regulariser(
            "ewc",
            "Elastic Weight Consolidation (Kirkpatrick et al. 2017)",
            _ewc,
            frozen=True,
            fisher=True,
            summary="Σ F (θ − π)², diagonal Fisher on replay rows",
        ),
        Regulariser(
            "l2sp",
            "L2-SP (Li, Grandvalet & Davoine 2018)",
            _l2sp,
            frozen=True,
            summary="‖θ − π‖², the squared distance to the parent",
        ),
    )
}


def get(name: str) -> Regulariser:
    """The registry entry for `reg.method=name` (KeyError naming the valid ones otherwise)."""
    try:
        return REGULARISERS[name]
    except KeyError:
        raise KeyError(
            f"reg.method={name!r} is not a regulariser; valid: {', '.join(REGULARISERS)}"
        ) from None
