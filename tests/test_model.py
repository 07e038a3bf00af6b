"""Model invariants: parameter count, initial loss, KV-cache decoding, causality, the fused
chunked loss (values and gradients), bf16 vs f32, remat. All under strict dtype promotion.

Compilation dominates on a CPU, so the tests share one model, one token shape and the jitted
functions of the `net` fixture; variants (bf16, remat) reuse the same f32 parameters.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib.config import ModelConfig
from forgetting_lib.engine import losses, model

CFG = ModelConfig(D=32, L=2, H=8, V=64, dtype="float32")
B, T = 8, 16  # B*T = 128: not a multiple of the odd chunk size 7 used below


@pytest.fixture(autouse=True)
def strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture(scope="module")
def net():
    with jax.numpy_dtype_promotion("strict"):
        graphdef, params = model.init_model(CFG, key=jax.random.key(0))
    return SimpleNamespace(graphdef=graphdef, params=params, forward=jax.jit(model.make_forward(graphdef)))


def tokens_for(seed: int = 1, shape=(B, T)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.V, dtype=jnp.int32)


def graph_of(**changes):
    """The graph of CFG with some fields changed (CFG's parameters fit it unchanged)."""
    return model.abstract_params(dataclasses.replace(CFG, **changes))[0]


def fused_loss(graphdef):
    hidden = model.make_hidden(graphdef)
    return lambda p, t: jnp.mean(losses.ntp_from_hidden(*hidden(p, t), t))


def test_param_count_matches_formula(net):
    D, L, V = CFG.D, CFG.L, CFG.V
    expected = 12 * L * D**2 + 2 * D * V
    assert model.param_formula(CFG) == expected == model.count_params(net.params)
    assert model.paper_param_count(CFG) == expected - D * V
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(net.params))


@pytest.mark.parametrize("D, L, H, V", [(32, 1, 8, 64), (64, 3, 16, 128), (48, 2, 16, 100)])
def test_param_formula_matches_the_shapes_of_other_sizes(D, L, H, V):
    cfg = ModelConfig(D=D, L=L, H=H, V=V, dtype="float32")
    _, abstract = model.abstract_params(cfg)
    assert model.count_params(abstract) == model.param_formula(cfg) == 12 * L * D**2 + 2 * D * V


def test_initial_loss_is_near_ln_v(net):
    tokens = tokens_for()
    logits = net.forward(net.params, tokens)
    assert logits.shape == (B, T, CFG.V) and logits.dtype == jnp.float32
    loss = float(losses.ntp_loss(logits, tokens))
    # N(0, D^-1/2) unembedding of a unit-RMS hidden state gives logits of ~unit std, so the
    # initial loss is ln V plus about half a nat (E[logsumexp] of unit-variance logits).
    assert 0.7 < float(jnp.std(logits)) < 1.4
    assert math.log(CFG.V) + 0.2 < loss < math.log(CFG.V) + 0.8, (loss, math.log(CFG.V))


def test_kv_cache_decoding_equals_full_forward(net):
    tokens, prefill = tokens_for(), 5
    full = net.forward(net.params, tokens)
    step = jax.jit(partial(model.decode, net.graphdef))
    cache = model.init_cache(net.graphdef, net.params, B, T)
    logits, cache = step(net.params, tokens[:, :prefill], cache, jnp.int32(0))
    pieces = [logits]
    for t in range(prefill, T):
        logits, cache = step(net.params, tokens[:, t : t + 1], cache, jnp.int32(t))
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    assert decoded.shape == full.shape
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=1e-5)
    # every position's keys were written (a wrong `start` would leave zero rows behind)
    assert all(float(jnp.min(jnp.abs(c["k"]).sum(axis=(2, 3)))) > 0 for c in cache)


def test_causality(net):
    tokens, t = tokens_for(), 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.V)
    a, b = net.forward(net.params, tokens), net.forward(net.params, changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-3  # and it does change the rest


@pytest.mark.slow
def test_fused_chunked_loss_and_gradient_equal_unfused(net, monkeypatch):
    # 7 rows per chunk: 128 positions make 19 chunks, the last one padded
    monkeypatch.setattr(losses, "chunk_rows", lambda: 7)
    tokens = tokens_for()
    forward, hidden = model.make_forward(net.graphdef), model.make_hidden(net.graphdef)

    def fused(p, t):
        per = losses.ntp_from_hidden(*hidden(p, t), t)
        return jnp.mean(per), per

    def plain(p, t):
        per = losses.ntp_per_position(forward(p, t), t)
        return jnp.mean(per), per

    (_, per_f), g_f = jax.jit(jax.value_and_grad(fused, has_aux=True))(net.params, tokens)
    (_, per_p), g_p = jax.jit(jax.value_and_grad(plain, has_aux=True))(net.params, tokens)
    assert per_f.shape == per_p.shape == (B, T - 1) and per_f.dtype == jnp.float32
    np.testing.assert_allclose(per_f, per_p, atol=2e-5, rtol=1e-5)
    leaves_f, leaves_p = jax.tree_util.tree_leaves(g_f), jax.tree_util.tree_leaves(g_p)
    assert len(leaves_f) == len(leaves_p) == 2 + 4 * CFG.L
    for a, b in zip(leaves_f, leaves_p):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    assert min(float(jnp.max(jnp.abs(g))) for g in leaves_p) > 0  # every matrix gets a gradient


def test_fused_loss_with_fewer_positions_than_a_chunk(net):
    hidden, forward = model.make_hidden(net.graphdef), model.make_forward(net.graphdef)

    @jax.jit
    def both(p, t):
        return losses.ntp_from_hidden(*hidden(p, t), t), losses.ntp_per_position(forward(p, t), t)

    tokens = tokens_for(shape=(2, 5))  # 10 positions < chunk_rows(): one short chunk
    fused, plain = both(net.params, tokens)
    np.testing.assert_allclose(fused, plain, atol=2e-5, rtol=1e-5)


def test_bf16_forward_is_close_to_f32(net):
    g16 = graph_of(dtype="bfloat16")  # same f32 parameters, bf16 activations
    tokens = tokens_for()
    a = net.forward(net.params, tokens)
    b = jax.jit(model.make_forward(g16))(net.params, tokens)
    assert b.dtype == jnp.float32  # logits leave the model in f32
    assert float(jnp.max(jnp.abs(a - b))) < 0.15
    assert abs(float(losses.ntp_loss(a, tokens)) - float(losses.ntp_loss(b, tokens))) < 0.02
    h16, w = jax.jit(model.make_hidden(g16))(net.params, tokens)
    assert h16.dtype == jnp.bfloat16 and w.dtype == jnp.float32
    fused = losses.ntp_from_hidden(h16, w, tokens)
    assert fused.dtype == jnp.float32
    np.testing.assert_allclose(fused, losses.ntp_per_position(b, tokens), atol=2e-2)


def test_remat_gives_the_same_loss_and_gradient(net):
    tokens = tokens_for()
    l0, g0 = jax.jit(jax.value_and_grad(fused_loss(net.graphdef)))(net.params, tokens)
    l1, g1 = jax.jit(jax.value_and_grad(fused_loss(graph_of(remat=True))))(net.params, tokens)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_init_depends_on_the_key(net):
    _, same = model.init_model(CFG, key=jax.random.key(0))
    _, other = model.init_model(CFG, key=jax.random.key(1))
    for x, y, z in zip(*(jax.tree_util.tree_leaves(p) for p in (net.params, same, other))):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)
