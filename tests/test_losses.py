"""Loss invariants: KL(p||p) = 0, KL >= 0, certain predictions cost ~0, the last position has no
target, and the fused KL equals the unfused one. Under strict dtype promotion."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib.engine import losses

# jitted once and shared: eager dispatch compiles every primitive separately (slow on a CPU)
kl_pp, ntp_pp = jax.jit(losses.kl_per_position), jax.jit(losses.ntp_per_position)
SHAPE = (3, 7, 50)


@pytest.fixture(autouse=True)
def strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def random_logits(seed: int, shape=SHAPE, scale: float = 3.0) -> jax.Array:
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_kl_of_a_distribution_with_itself_is_zero():
    p = random_logits(0)
    kl = kl_pp(p, p)
    assert kl.shape == (3, 7) and kl.dtype == jnp.float32
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    # invariant to a per-position shift of the logits (same distribution)
    np.testing.assert_allclose(kl_pp(p, p + 5.0), 0.0, atol=1e-5)
    assert abs(float(losses.kl_loss(p, p))) < 1e-6


def test_kl_is_nonnegative_and_positive_for_different_distributions():
    for seed in range(5):
        kl = kl_pp(random_logits(seed), random_logits(seed + 100))
        assert float(jnp.min(kl)) >= -1e-6
        assert float(jnp.mean(kl)) > 0.1


def test_kl_matches_a_direct_computation():
    p, q = random_logits(1), random_logits(2)

    @jax.jit
    def direct(p, q):
        pp, qq = jax.nn.softmax(p, axis=-1), jax.nn.softmax(q, axis=-1)
        return jnp.sum(pp * (jnp.log(pp) - jnp.log(qq)), axis=-1)

    np.testing.assert_allclose(kl_pp(p, q), direct(p, q), atol=1e-5, rtol=1e-5)


def test_kl_loss_sends_no_gradient_into_the_teacher():
    p, q = random_logits(3), random_logits(4)
    g_teacher = jax.grad(lambda t: losses.kl_loss(t, q))(p)
    np.testing.assert_array_equal(g_teacher, 0.0)
    g_student = jax.grad(lambda s: losses.kl_loss(p, s))(q)
    assert float(jnp.max(jnp.abs(g_student))) > 0


def test_kl_in_bf16_is_computed_in_f32():
    p = random_logits(5).astype(jnp.bfloat16)
    kl = kl_pp(p, p)
    assert kl.dtype == jnp.float32
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)


def random_tokens(seed: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), SHAPE[:2], 0, SHAPE[2], dtype=jnp.int32)


def test_ntp_of_a_certain_correct_prediction_is_zero():
    tokens = random_tokens(0)
    logits = 100.0 * jax.nn.one_hot(jnp.roll(tokens, -1, axis=1), SHAPE[2], dtype=jnp.float32)
    per = ntp_pp(logits, tokens)
    assert per.shape == (SHAPE[0], SHAPE[1] - 1) and per.dtype == jnp.float32
    np.testing.assert_allclose(per, 0.0, atol=1e-6)
    # certain and wrong: ~100 nats
    wrong = ntp_pp(
        100.0 * jax.nn.one_hot((tokens + 1) % SHAPE[2], SHAPE[2], dtype=jnp.float32),
        jnp.roll(tokens, 1, axis=1),
    )
    assert float(jnp.min(wrong)) > 99.0


def test_ntp_of_uniform_logits_is_ln_v():
    per = ntp_pp(jnp.zeros(SHAPE, jnp.float32), random_tokens(1))
    np.testing.assert_allclose(per, math.log(SHAPE[2]), rtol=1e-6)


def test_last_position_is_excluded():
    tokens, logits = random_tokens(2), random_logits(6)
    base = ntp_pp(logits, tokens)
    assert base.shape == (SHAPE[0], SHAPE[1] - 1)
    # the last position's logits predict nothing: changing them changes nothing
    np.testing.assert_array_equal(ntp_pp(logits.at[:, -1].set(99.0), tokens), base)
    # the first token is never a target: changing it changes nothing either
    np.testing.assert_array_equal(ntp_pp(logits, tokens.at[:, 0].add(1) % SHAPE[2]), base)
    # while a target token does matter, at exactly its position (token 3 is scored at position 2)
    moved = ntp_pp(logits, tokens.at[:, 3].set((tokens[:, 3] + 1) % SHAPE[2]))
    assert (moved[:, 2] != base[:, 2]).all()
    np.testing.assert_array_equal(np.delete(moved, 2, axis=1), np.delete(base, 2, axis=1))
    np.testing.assert_allclose(losses.ntp_loss(logits, tokens), jnp.mean(base), rtol=1e-6)


@pytest.mark.parametrize("chunk", [5, 512])
def test_fused_kl_and_ntp_equal_unfused(monkeypatch, chunk):
    monkeypatch.setattr(losses, "chunk_rows", lambda: chunk)
    B, T, D, V = 2, 9, 8, 30
    keys = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(keys[0], (B, T, D), jnp.float32)
    w = jax.random.normal(keys[1], (D, V), jnp.float32)
    h_t = jax.random.normal(keys[2], (B, T, D), jnp.float32)
    w_t = jax.random.normal(keys[3], (D, V), jnp.float32)
    tokens = jax.random.randint(keys[4], (B, T), 0, V, dtype=jnp.int32)

    @jax.jit
    def both(h, w, h_t, w_t, tokens):
        fused = losses.kl_from_hidden((h_t, w_t), h, w, tokens)
        logits, t_logits = jnp.einsum("btd,dv->btv", h, w), jnp.einsum("btd,dv->btv", h_t, w_t)
        return fused, (losses.ntp_per_position(logits, tokens), losses.kl_per_position(t_logits, logits))

    (ntp, kl), (ntp_plain, kl_plain) = both(h, w, h_t, w_t, tokens)
    np.testing.assert_allclose(ntp, ntp_plain, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(kl, kl_plain, atol=1e-4, rtol=1e-5)
    assert float(jnp.min(kl)) > 0
    g = jax.jit(jax.grad(lambda t: jnp.mean(losses.kl_from_hidden((t, w_t), h, w, tokens)[1])))(h_t)
    np.testing.assert_array_equal(g, 0.0)  # the teacher is frozen


def test_kl_from_cached_teacher_equals_kl_per_position():
    t, s = random_logits(3), random_logits(4)
    cached = jax.jit(losses.cached_teacher)(t)[0]
    assert cached.probs.shape == SHAPE and cached.negent.shape == SHAPE[:2]
    np.testing.assert_allclose(cached.probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(losses.kl_from_cached)(cached, s), kl_pp(t, s), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(losses.kl_from_cached)(cached, t), 0.0, atol=1e-5)


@pytest.mark.parametrize("chunk", [5, 512])
def test_chunked_kl_to_a_cached_teacher_equals_recomputing_it(monkeypatch, chunk):
    monkeypatch.setattr(losses, "chunk_rows", lambda: chunk)
    B, T, D, V = 2, 9, 8, 30
    keys = jax.random.split(jax.random.key(1), 5)
    h, h_t = (jax.random.normal(k, (B, T, D), jnp.float32) for k in keys[:2])
    w, w_t = (jax.random.normal(k, (D, V), jnp.float32) for k in keys[2:4])
    tokens = jax.random.randint(keys[4], (B, T), 0, V, dtype=jnp.int32)

    @jax.jit
    def both(h, w, h_t, w_t, tokens):
        cached = losses.cached_teacher(jnp.einsum("btd,dv->btv", h_t, w_t))[0]
        return losses.chunked_stats(h, w, tokens, cached), losses.chunked_stats(h, w, tokens, (h_t, w_t))

    (ntp, kl), (ntp_ref, kl_ref) = both(h, w, h_t, w_t, tokens)
    np.testing.assert_array_equal(ntp, ntp_ref)
    np.testing.assert_allclose(kl, kl_ref, atol=1e-4, rtol=1e-5)
    assert float(jnp.min(kl)) > 0
