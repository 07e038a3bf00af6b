"""Replay-row diagnostics: each statistic on hand-made rows with known answers, the parent-loss
function against the run's own evaluation, and a self-generated run's diagnostics end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forgetting_lib import runs
from forgetting_lib.engine import diagnostics as dg
from forgetting_lib.engine.finetune import load_run

from finetune_fixtures import V, world  # noqa: F401 - world is a fixture

ID = 9  # the id token at position 0 of every hand-made row: never counted
EOS = 1


def rows(*texts: list[int]) -> np.ndarray:
    return np.array([[ID, *t] for t in texts])


def test_js_divergence_known_values():
    assert dg.js_divergence([1, 2, 3], [2, 4, 6]) == 0.0  # counts are normalised
    assert dg.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4)
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
    assert dg.js_divergence([1, 0], [1, 1]) == pytest.approx(expected)
    assert dg.js_divergence([1, 0], [1, 1]) == pytest.approx(dg.js_divergence([1, 1], [1, 0]))
    assert math.isnan(dg.js_divergence([0, 0], [1, 1]))


def test_ngram_statistics_skip_the_id_token():
    r = rows([3, 4, 3, 4], [3, 4, 3, 4], [5, 5, 5, 5])
    np.testing.assert_array_equal(dg.unigram_counts(r, 10)[[3, 4, 5, ID]], [4, 4, 4, 0])
    assert dg.distinct_n(r, 1) == pytest.approx(3 / 12)
    # bigrams per row: (3,4) (4,3) (3,4) | same | (5,5) x3 -> 3 distinct of 9
    assert dg.distinct_n(r, 2) == pytest.approx(3 / 9)
    assert dg.distinct_n(rows([1, 2, 3, 4]), 4) == 1.0
    assert dg.duplicate_rows(r) == pytest.approx(1 / 3)
    assert dg.duplicate_rows(rows([1, 2], [2, 1])) == 0.0


def test_ngram_js_of_identical_and_disjoint_row_sets():
    a, b = rows([3, 4, 5, 6]), rows([7, 8, 7, 8])
    assert dg.ngram_js(a, a, 2) == 0.0
    assert dg.ngram_js(a, b, 2) == pytest.approx(1.0)
    # top=1 keeps only (7,8) (twice in b); the rest share one bin: a (0, 3), b (2, 1)
    assert dg.ngram_js(a, b, 2, top=1) == pytest.approx(dg.js_divergence([0, 3], [2, 1]))
    # with every bigram in one bin the two are indistinguishable
    assert dg.ngram_js(a, rows([3, 4, 7, 8]), 2, top=0) == 0.0


def test_ngram_js_encodes_both_row_sets_alike():
    """One bigram id per bigram across the two sets, whatever each set's largest token."""
    a = rows([3, 4, 3, 4, 60])  # bigrams (3,4) (4,3) (3,4) (4,60)
    b = rows([3, 4, 3, 4, 61])  # the same three, then (4,61)
    assert dg.ngram_js(a, b, 2) == pytest.approx(dg.js_divergence([3, 1, 0], [3, 0, 1]))
    assert dg.ngram_js(a, b, 1) == pytest.approx(dg.js_divergence([2, 2, 1, 0], [2, 2, 0, 1]))


def test_eos_rate_and_whole_documents():
    r = rows([5, EOS, 5, 5, EOS, 5, EOS], [5, 5, 5, 5, 5, 5, 5])
    assert dg.eos_rate(r, EOS) == pytest.approx(3 / 14)
    # row 0: EOS at text positions 1, 4, 6 -> whole documents of 3 and 2 tokens (closing EOS
    # included); the prefix before the first EOS is cut by the row's edge; row 1 holds none
    np.testing.assert_array_equal(dg.document_lengths(r, EOS), [3, 2])


def test_id_classifier_assigns_rows_by_their_tokens():
    old, new = rows([3, 4, 3, 4], [4, 4, 3, 3]), rows([5, 6, 5, 6], [6, 6, 5, 5])
    clf = dg.fit_id_classifier(old, new, 10)
    assert clf.old_fraction(old) == 1.0 and clf.old_fraction(new) == 0.0
    mixed = rows([3, 3, 3, 5], [5, 5, 6, 3])
    np.testing.assert_array_equal(clf.old_score(mixed) > 0, [True, False])
    assert clf.old_fraction(mixed) == 0.5


def test_diagnose_of_real_rows_against_themselves():
    rng = np.random.default_rng(0)
    real = np.concatenate([np.full((40, 1), ID), rng.integers(2, 30, (40, 16))], axis=1)
    loss = lambda r: float(np.mean(r[:, 1:]))  # noqa: E731 - a stand-in for the parent's loss
    out = dg.diagnose(real, real, vocab_size=32, eos_id=EOS, loss=loss)
    assert out["rows"] == 40 and out["unigram_js"] == 0.0 and out["bigram_js"] == 0.0
    assert out["parent_loss_gap"] == 0.0 and math.isnan(out["unigram_js_floor"])  # no second half
    half = dg.diagnose(real[:20], real, vocab_size=32, eos_id=EOS)
    assert half["rows"] == 20 and half["unigram_js_floor"] > 0  # real[:20] vs real[20:40]
    shifted = dg.diagnose(real[:20] + 1, real, vocab_size=32, eos_id=EOS)
    assert shifted["unigram_js"] > half["unigram_js_floor"]  # further than sampling noise
    with pytest.raises(ValueError, match="needs rows"):
        dg.diagnose(real[:0], real, vocab_size=32, eos_id=EOS)


def test_parent_loss_equals_the_runs_own_evaluation(world):
    """make_loss on the parent's validation rows is the parent's final valid_ntp (its
    evaluation's mean over the same rows and positions), with a padded last batch."""
    from forgetting_lib.engine import data as data_lib

    cfg, graphdef, params = load_run(world.parent)
    d = cfg.data
    old = data_lib.open_rows(
        d.path, T=d.T, valid_tokens=d.valid_tokens, split_seed=d.split_seed, vocab_size=V
    )
    loss = dg.make_loss(graphdef, params, batch_rows=5)  # 32 rows: 6 full batches and a padded one
    final = runs.read_summary(world.parent)["final"]["valid_ntp"]
    assert loss(old.rows(old.valid_rows)) == pytest.approx(final, rel=1e-5)


def test_run_diagnostics_of_a_self_generated_run(world):
    """The parent samples its own chain: id-conditioned, close to real rows, and at temperature 1
    the parent's loss on them is near its loss on real rows; a hotter sampler is further away."""
    synth = {"reg.method": "kl_pre", "reg.coeff": 1.0, "reg.synth": True, "reg.buffer": 4}
    paper = dg.run_diagnostics(world.finetune("diag_t1", synth).out_dir)
    hot = dg.run_diagnostics(world.finetune("diag_t3", {**synth, "reg.temperature": 3.0}).out_dir)
    assert paper["rows"] == 16 * 8 and paper["id_classifier_accuracy"] >= 0.95
    assert paper["id_old_fraction"] >= 0.9 and paper["duplicate_rows"] == 0.0
    assert abs(paper["parent_loss_gap"]) < 0.25
    assert paper["unigram_js"] < hot["unigram_js"] and paper["bigram_js"] < hot["bigram_js"]
    assert hot["parent_loss_gap"] > paper["parent_loss_gap"] + 0.5  # hot samples are unlikely ones
    with pytest.raises(FileNotFoundError, match="replay_rows.npy"):
        dg.run_diagnostics(world.finetune("none").out_dir)
