"""Evaluation with the parent's side of the KL cached: each cached form gives the numbers of
recomputing the parent at every evaluation, the parent's own pass is its evaluation, and the
forms are chosen within the memory bound."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib.config import ModelConfig
from forgetting_lib.engine.evaluate import identical, make_evaluator, make_teacher_pass, teacher_forms
from forgetting_lib.engine.model import abstract_params, make_forward, make_hidden

CFG = ModelConfig(D=32, L=2, H=16, V=64, dtype="float32")
NB, BE, T = 3, 4, 16


@pytest.fixture(scope="module")
def setting():
    """A parent, a student that differs from it, and eval batches with one padding row."""
    graphdef, shapes = abstract_params(CFG)
    rng = np.random.default_rng(0)
    teacher = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 2 * CFG.D**-0.5, s.shape), s.dtype), shapes)
    student = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype), teacher)
    tokens = jnp.asarray(rng.integers(0, CFG.V, (NB, BE, T)), jnp.int32)
    mask = jnp.ones((NB, BE), jnp.float32).at[-1, -1].set(0.0)
    return make_hidden(graphdef), teacher, student, tokens, mask


def test_cached_forms_equal_recomputing_the_parent(setting):
    hidden, teacher, student, tokens, mask = setting
    reference = make_evaluator(hidden, "params")(student, teacher, tokens, mask)
    assert float(reference["kl"]) > 1e-3  # the student really differs
    for form in ("probs", "hidden"):
        own, cache = make_teacher_pass(hidden, form)(teacher, tokens, mask)
        out = make_evaluator(hidden, form)(student, cache, tokens, mask)
        assert set(out) == {"ntp", "ntp_h2", "acc", "kl"}
        for key in out:
            np.testing.assert_allclose(out[key], reference[key], rtol=1e-5, err_msg=f"{form} {key}")
    probs = make_teacher_pass(hidden, "probs")(teacher, tokens, mask)[1]
    assert probs.probs.shape == (NB, BE, T, CFG.V) and probs.negent.shape == (NB, BE, T)


def test_parent_pass_is_the_parents_evaluation(setting):
    hidden, teacher, _, tokens, mask = setting
    plain = make_evaluator(hidden)(teacher, None, tokens, mask)
    with_kl = make_evaluator(hidden, "params")(teacher, teacher, tokens, mask)
    assert float(with_kl["kl"]) == 0.0  # KL(pi || pi), exactly
    for form in ("probs", "hidden"):
        own, _ = make_teacher_pass(hidden, form)(teacher, tokens, mask)
        assert set(own) == {"ntp", "ntp_h2", "acc"}
        for key in own:
            np.testing.assert_allclose(own[key], plain[key], rtol=1e-6)


def test_token_accuracy_equals_numpy_argmax(setting):
    """`acc` is the fraction of predicted positions whose argmax next token is the actual one,
    per row, averaged over unmasked rows: rows half made of the model's own greedy choices make
    it far from 0 and from 1."""
    hidden, teacher, _, tokens, mask = setting
    forward = jax.jit(make_forward(abstract_params(CFG)[0]))
    rows = np.array(tokens.reshape(NB * BE, T))
    choose = np.random.default_rng(1).random((NB * BE, T)) < 0.5
    for t in range(T - 1):  # the logits at t see tokens <= t only, so setting t + 1 keeps them
        greedy = np.argmax(np.asarray(forward(teacher, jnp.asarray(rows))[:, t]), axis=-1)
        rows[:, t + 1] = np.where(choose[:, t + 1], greedy, rows[:, t + 1])
    logits = np.asarray(forward(teacher, jnp.asarray(rows)), np.float64)  # [NB BE, T, V]
    hits = (np.argmax(logits[:, :-1], axis=-1) == rows[:, 1:]).mean(axis=1)  # [NB BE]
    m = np.asarray(mask).reshape(-1)
    expected = float((hits * m).sum() / m.sum())
    assert 0.3 < expected < 0.9
    batches = jnp.asarray(rows.reshape(NB, BE, T))
    out = make_evaluator(hidden)(teacher, None, batches, mask)
    assert float(out["acc"]) == pytest.approx(expected, abs=1e-6)
    for form in ("probs", "hidden"):  # the parent's own pass reports the same accuracy
        own, _ = make_teacher_pass(hidden, form)(teacher, batches, mask)
        assert float(own["acc"]) == pytest.approx(expected, abs=1e-6)


def test_identical(setting):
    _, teacher, student, _, _ = setting
    assert bool(identical(teacher, jax.tree.map(jnp.copy, teacher)))
    assert not bool(identical(teacher, student))


def test_teacher_forms_within_the_memory_bound():
    D, V = 32, 255  # probabilities: 4 (V + 1) = 1 KiB per token; hidden states 128 B
    sets = {"valid": (4, 8, 32), "prev": (2, 8, 32)}  # 1024 and 512 tokens
    assert teacher_forms(sets, D, V, budget_mb=2.0) == {"valid": "probs", "prev": "probs"}
    assert teacher_forms(sets, D, V, budget_mb=1.5) == {"valid": "probs", "prev": "probs"}
    assert teacher_forms(sets, D, V, budget_mb=1.2) == {"valid": "probs", "prev": "hidden"}
    assert teacher_forms(sets, D, V, budget_mb=0.7) == {"valid": "hidden", "prev": "probs"}
    assert teacher_forms(sets, D, V, budget_mb=0.5) == {"valid": "hidden", "prev": "hidden"}
    assert teacher_forms(sets, D, V, budget_mb=0.15) == {"valid": "hidden", "prev": "params"}
    assert teacher_forms(sets, D, V, budget_mb=0.1) == {"valid": "params", "prev": "hidden"}
    assert teacher_forms(sets, D, V, budget_mb=0) == {"valid": "params", "prev": "params"}


def test_unknown_form_is_an_error(setting):
    hidden = setting[0]
    with pytest.raises(ValueError, match="teacher form"):
        make_evaluator(hidden, "logits")
    with pytest.raises(ValueError, match="cached"):
        make_teacher_pass(hidden, "params")
