"""Sampler invariants on a tiny model: prompt kept, determinism, cache path = full forward,
temperature limits, EOS padding, the sampled distribution (exact inverse-CDF draws, and the same
token statistics as `jax.random.categorical` on full forwards), key groups, one trace per shape,
and top-p sampling (the nucleus equals its sorted definition; only nucleus tokens are drawn)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib.config import ModelConfig
from forgetting_lib.engine import sampling
from forgetting_lib.engine.model import abstract_params, make_forward
from forgetting_lib.engine.sampling import make_sampler, sample_from_id

CFG = ModelConfig(D=32, L=2, H=16, V=64, dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def strict_promotion():
    """Every sampler call runs with strict dtype promotion: implicit casts are errors."""
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture(scope="module")
def model():
    """Tiny model with weights N(0, (3 / sqrt(D))^2): logits ~3x the usual init, so next-token
    distributions are far from uniform. Drawn with numpy (jitting the init costs ~3 s here)."""
    graphdef, shapes = abstract_params(CFG)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 3 * CFG.D**-0.5, s.shape), s.dtype), shapes)
    return graphdef, params


@pytest.fixture(scope="module")
def free(model):
    """The replay sampler (temperature 1, never stops), shared so it compiles once."""
    return make_sampler(model[0], length=16)


@pytest.fixture(scope="module")
def greedy_rows(model):
    graphdef, params = model
    return make_sampler(graphdef, length=12, temperature=0.0)(params, prompt(4, 3), jax.random.key(0))


def prompt(B: int, P: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, P), 0, CFG.V, jnp.int32)  # [B, P]


def test_shape_dtype_and_prompt_kept(model, free):
    _, params = model
    x = prompt(64, 1)
    rows = free(params, x, jax.random.key(0))
    assert rows.shape == (64, 16) and rows.dtype == jnp.int32
    np.testing.assert_array_equal(rows[:, :1], x)
    assert int(rows.min()) >= 0 and int(rows.max()) < CFG.V
    replay = sample_from_id(free, params, 7, 64, jax.random.key(0))
    assert replay.shape == (64, 16) and bool(jnp.all(replay[:, 0] == 7))


def test_deterministic_for_a_key(model, free):
    _, params = model
    x = prompt(64, 1)
    a, b = free(params, x, jax.random.key(3)), free(params, x, jax.random.key(3))
    c = free(params, x, jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.mean(a[:, 1:] != c[:, 1:])) > 0.5


def test_greedy_cache_equals_full_forward_loop(model, greedy_rows):
    graphdef, params = model
    forward = jax.jit(make_forward(graphdef))
    rows = prompt(4, 3)
    for t in range(3, 12):  # re-run the full forward on the prefix at every step, no cache
        prefix = jnp.pad(rows, ((0, 0), (0, 12 - t)))  # [B, 12]: causal, so padding is unseen
        nxt = jnp.argmax(forward(params, prefix)[:, t - 1], axis=-1).astype(jnp.int32)  # [B]
        rows = jnp.concatenate([rows, nxt[:, None]], axis=1)  # [B, t + 1]
    np.testing.assert_array_equal(greedy_rows, rows)


def test_low_temperature_is_greedy(model, greedy_rows):
    graphdef, params = model
    cold = make_sampler(graphdef, length=12, temperature=1e-6)(params, prompt(4, 3), jax.random.key(9))
    np.testing.assert_array_equal(greedy_rows, cold)


def test_stop_at_eos_pads_after_first_eos(model, free):
    graphdef, params = model
    eos, length = 5, 16
    x = jnp.where(prompt(64, 1, seed=7) == eos, eos + 1, prompt(64, 1, seed=7))  # no EOS prompts
    key = jax.random.key(11)
    rows = np.asarray(free(params, x, key))
    stopped = np.asarray(make_sampler(graphdef, length=length, eos_id=eos, stop_at_eos=True)(params, x, key))
    is_eos = rows == eos
    first = np.where(is_eos.any(1), is_eos.argmax(1), length)  # [B]
    assert 0 < (first < length - 1).sum() < len(first)  # some rows stop mid-row, some never
    expected = np.where(np.arange(length)[None] > first[:, None], eos, rows)
    np.testing.assert_array_equal(stopped, expected)
    assert int((rows[first < length - 1] != eos).sum()) > 0  # the default really does not stop


def test_sampled_distribution_matches_softmax(model):
    graphdef, params = model
    n, P = 16_384, 4
    x = jnp.tile(prompt(1, P, seed=8), (n, 1))  # [n, P]: one prefix, n continuations
    rows = make_sampler(graphdef, length=P + 1)(params, x, jax.random.key(2))
    freqs = np.bincount(np.asarray(rows[:, P]), minlength=CFG.V) / n
    probs = np.asarray(jax.nn.softmax(jax.jit(make_forward(graphdef))(params, x[:1])[0, -1]))
    assert 0.5 * np.abs(probs - 1 / CFG.V).sum() > 0.3  # the target is far from uniform
    assert 0.5 * np.abs(freqs - probs).sum() < 0.04  # total variation (~0.015 expected from n)


def test_inverse_cdf_draws_the_softmax():
    V, n = 50, 100_000
    logits = 3.0 * jax.random.normal(jax.random.key(0), (V,), jnp.float32)
    logits = logits.at[7].set(-jnp.inf).at[8].set(-200.0)  # probability 0 and ~1e-88
    u = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n  # one uniform in each 1/n slice of [0, 1)
    draws = jax.jit(sampling.inverse_cdf)(jnp.tile(logits, (n, 1)), u)
    counts = np.bincount(np.asarray(draws), minlength=V)
    expected = n * np.asarray(jax.nn.softmax(logits))
    # stratified uniforms: each token gets its share of the slices, up to one slice and rounding
    np.testing.assert_allclose(counts, expected, atol=1.0 + 1e-4 * n)
    assert counts[7] == 0 and counts[8] == 0
    edges = jax.jit(sampling.inverse_cdf)(jnp.tile(logits, (2, 1)), jnp.array([0.0, 1.0 - 2**-24]))
    assert 0 <= int(edges.min()) and int(edges.max()) < V
    # the smallest uniform skips leading tokens of probability 0
    leading = jnp.full((V,), 1.0).at[:3].set(-jnp.inf)
    assert int(sampling.inverse_cdf(leading[None], jnp.zeros(1))[0]) == 3


def reference_rows(graphdef, params, x: jax.Array, length: int, key: jax.Array, temperature: float = 1.0):
    """Rows sampled the straightforward way: a full forward over the prefix at every position and
    `jax.random.categorical` (Gumbel-max over all V logits), no cache."""
    forward = jax.jit(make_forward(graphdef))
    rows = x
    for t in range(x.shape[1], length):
        logits = forward(params, jnp.pad(rows, ((0, 0), (0, length - t))))[:, t - 1]  # [B, V]
        nxt = jax.random.categorical(jax.random.fold_in(key, t), logits / temperature, axis=-1)
        rows = jnp.concatenate([rows, nxt.astype(jnp.int32)[:, None]], axis=1)
    return rows


def test_same_token_statistics_as_categorical_sampling(model):
    graphdef, params = model
    n, length = 4096, 6
    x = jnp.full((n, 1), 3, jnp.int32)

    def unigram(rows):  # pooled over the sampled positions 1..length-1 [V]
        return np.bincount(np.asarray(rows[:, 1:]).ravel(), minlength=CFG.V) / (n * (length - 1))

    def bigram_tv(a, b):  # TV distance of (position 1, position 2) pairs [V * V]
        pairs = [np.bincount(np.asarray(r[:, 1] * CFG.V + r[:, 2]), minlength=CFG.V**2) / n for r in (a, b)]
        return 0.5 * np.abs(pairs[0] - pairs[1]).sum()

    ours = make_sampler(graphdef, length=length)(params, x, jax.random.key(5))
    theirs = reference_rows(graphdef, params, x, length, jax.random.key(6))
    again = reference_rows(graphdef, params, x, length, jax.random.key(7))
    hot = reference_rows(graphdef, params, x, length, jax.random.key(6), temperature=1.5)
    tv = lambda a, b: 0.5 * np.abs(unigram(a) - unigram(b)).sum()  # noqa: E731
    noise = tv(theirs, again)  # two samples of the same distribution
    assert tv(ours, theirs) < max(2 * noise, 0.04)
    assert tv(hot, theirs) > 0.1  # a different distribution is detected
    assert bigram_tv(ours, theirs) < 1.3 * bigram_tv(theirs, again) + 0.02


def test_key_groups_equal_separate_calls(model, free):
    """G keys sample G groups of rows in one call, each equal to a call with its own key."""
    _, params = model
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.arange(3))
    x = prompt(12, 1, seed=3)
    together = np.asarray(free(params, x, keys))
    for g in range(3):
        alone = free(params, x[4 * g : 4 * g + 4], keys[g])
        np.testing.assert_array_equal(together[4 * g : 4 * g + 4], alone)
    with pytest.raises(ValueError, match="equal key groups"):
        free(params, prompt(10, 1), keys)


def test_segment_ends():
    assert sampling.segment_ends(1, 128) == [32, 64, 96, 128]
    assert sampling.segment_ends(100, 128) == [100, 128]
    assert sampling.segment_ends(3, 5) == [3, 4, 5]
    assert sampling.segment_ends(1, 3, segments=8) == [1, 2, 3]


def test_traced_once_per_shape(model, monkeypatch):
    graphdef, params = model
    calls = []

    def counting_decode(*args):  # runs only while tracing (prefill and loop body)
        calls.append(1)
        return decode(*args)

    decode = sampling.decode
    monkeypatch.setattr(sampling, "decode", counting_decode)
    sample = make_sampler(graphdef, length=10)
    sample(params, prompt(3, 2), jax.random.key(0))
    traced = len(calls)
    assert traced > 0
    for seed in range(1, 4):  # new prompts, keys and parameter values; same shapes
        shifted = jax.tree.map(lambda x, s=seed: x + 0.01 * s, params)
        sample(shifted, prompt(3, 2, seed), jax.random.key(seed))
    assert len(calls) == traced


def test_rejects_bad_settings(model):
    graphdef, params = model
    with pytest.raises(ValueError):
        make_sampler(graphdef, length=8, stop_at_eos=True)
    with pytest.raises(ValueError):
        make_sampler(graphdef, length=8, temperature=-1.0)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            make_sampler(graphdef, length=8, top_p=top_p)
    with pytest.raises(ValueError):
        make_sampler(graphdef, length=4)(params, prompt(2, 5), jax.random.key(0))


def sorted_nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Reference nucleus [B, V] bool: sort each row, keep the top tokens until their mass >= top_p."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    keep = np.zeros_like(probs, bool)
    for b, row in enumerate(probs):
        order = np.argsort(-row, kind="stable")
        k = int(np.searchsorted(np.cumsum(row[order]), top_p)) + 1  # fewest tokens holding top_p
        keep[b, order[:k]] = True
    return keep


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_nucleus_equals_the_sorted_definition(top_p):
    logits = 2.0 * np.asarray(jax.random.normal(jax.random.key(3), (256, 50), jnp.float32))
    kept = np.isfinite(np.asarray(jax.jit(sampling.nucleus, static_argnums=1)(jnp.asarray(logits), top_p)))
    np.testing.assert_array_equal(kept, sorted_nucleus(logits, top_p))
    assert kept.sum(-1).min() >= 1  # the most likely token always stays
    if top_p < 0.99:
        assert kept.sum(-1).max() < 50  # something was cut


def test_top_p_samples_only_the_nucleus(model):
    """Every token a top-p sampler draws is in the nucleus of the full forward's logits at its
    position, and top_p=1 is the full-softmax sampler, token for token."""
    graphdef, params = model
    x = prompt(32, 1, seed=4)
    rows = np.asarray(make_sampler(graphdef, length=12, top_p=0.5)(params, x, jax.random.key(0)))
    logits = np.asarray(jax.jit(make_forward(graphdef))(params, jnp.asarray(rows)))  # [B, T, V]
    kept = sorted_nucleus(logits[:, :-1].reshape(-1, CFG.V), 0.5).reshape(32, 11, CFG.V)
    drawn = np.take_along_axis(kept, rows[:, 1:, None], axis=-1)[..., 0]
    assert drawn.all()
    assert kept.sum(-1).mean() < 0.5 * CFG.V  # the nucleus really is narrower than the vocabulary
    full = make_sampler(graphdef, length=12)(params, x, jax.random.key(0))
    np.testing.assert_array_equal(
        make_sampler(graphdef, length=12, top_p=1.0)(params, x, jax.random.key(0)), full
    )
