"""Toy continual learning: task generators, exact-match evaluation, CL metrics, a tiny sequential
run with self-generated replay, and the figure notebook executed end to end."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import yaml

from forgetting_lib import config as config_lib, runs
from forgetting_lib.figures.toy_continual import tasks as toy, train as toy_train

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "tasks": ["add", "sort"],
    "steps_per_task": 4,
    "batch_size": 8,
    "eval_every_steps": 2,
    "eval_problems": 16,
    "progress": False,
    "model": {"D": 32, "L": 1, "H": 8},
    "reg": {"coeff": 1.0, "replay_batch_size": 4, "buffer": 2},
}


@pytest.mark.parametrize("task", list(toy.TASKS))
def test_generated_answers_match_python_arithmetic(task):
    rows = np.asarray(toy.make_rows(task, 2000, key=jax.random.key(7)))
    assert rows.shape == (2000, toy.T) and rows.dtype == np.int32
    assert rows.min() >= 0 and rows.max() < toy.V
    for row in rows:
        name, a, b, answer = toy.parse_row(row)
        assert name == task and answer == toy.reference_answer(task, a, b)
        end = toy.PROMPT + len(answer)
        assert row[toy.PROMPT - 1] == toy.EQ and row[end] == toy.EOS
        assert (row[end + 1 :] == toy.PAD).all()
    ops = {toy.parse_row(r)[1] for r in rows}
    assert len(ops) > 800 and min(ops) < 50 and max(ops) > 950  # operands cover 000..999


def test_reference_answers_by_hand():
    assert toy.reference_answer("add", 456, 789) == [1, 2, 4, 5]
    assert toy.reference_answer("add", 1, 2) == [0, 0, 0, 3]
    assert toy.reference_answer("modadd", 456, 789) == [2, 4, 5]
    assert toy.reference_answer("reversal", 123, 45) == [5, 4, 0, 3, 2, 1]
    assert toy.reference_answer("sort", 312, 90) == [0, 0, 1, 2, 3, 9]


def test_fresh_problems_per_key():
    a = toy.make_rows("add", 64, key=jax.random.key(0))
    b = toy.make_rows("add", 64, key=jax.random.key(1))
    assert not jnp.array_equal(a, b)
    assert jnp.array_equal(a, toy.make_rows("add", 64, key=jax.random.key(0)))


def _oracle(sets: jax.Array, shuffle: bool):
    """A fake model: completes each prompt with its true row, or with another row's answer."""
    flat = sets.reshape(-1, toy.T)
    answers = flat[np.random.default_rng(0).permutation(len(flat))] if shuffle else flat

    def decode(prompts):
        assert jnp.array_equal(prompts, flat[:, : toy.PROMPT])
        return jnp.concatenate([prompts, answers[:, toy.PROMPT :]], axis=1)

    return decode


def test_evaluator_scores_oracles():
    sets = toy.eval_sets(toy.PAPER_TASKS, 256, key=jax.random.key(3))
    assert sets.shape == (4, 256, toy.T)
    np.testing.assert_array_equal(toy.accuracies(sets, _oracle(sets, False)), np.ones(4))
    assert toy.accuracies(sets, _oracle(sets, True)).max() < 0.03


def test_evaluator_ignores_tokens_after_eos_and_requires_eos():
    rows = toy.make_rows("add", 4, key=jax.random.key(0))
    after_eos = rows.at[:, -1].set(toy.EOS)  # the greedy sampler pads with EOS, not PAD
    assert toy.exact_match(rows, lambda p: after_eos).all()
    missing_eos = rows.at[:, toy.PROMPT + 4].set(toy.PAD)
    assert not toy.exact_match(rows, lambda p: missing_eos).any()


ACC = np.array([[1.0, 0.0, 0.0], [0.5, 0.9, 0.0], [0.2, 0.6, 0.8]])


def test_cl_metrics_on_a_hand_made_matrix():
    assert toy.average_accuracy(ACC) == pytest.approx((0.2 + 0.6 + 0.8) / 3)
    assert toy.backward_transfer(ACC) == pytest.approx(((0.2 - 1.0) + (0.6 - 0.9)) / 2)
    np.testing.assert_allclose(toy.forgetting(ACC), [0.8, 0.3])
    perfect = np.ones((3, 3))
    assert toy.backward_transfer(perfect) == 0 and (toy.forgetting(perfect) == 0).all()
    # forgetting takes the best *earlier* accuracy, not the diagonal
    late = np.array([[0.1, 0.0], [0.9, 1.0], [0.3, 1.0]])
    np.testing.assert_allclose(toy.forgetting(late), [0.6, 0.0])


def test_accuracy_matrix_takes_each_stage_last_evaluation():
    rows = [
        (0, 0, 0.0, 0.0, 0.0),
        (5, 0, 0.7, 0.1, 0.0),
        (10, 0, 1.0, 0.0, 0.0),
        (15, 1, 0.4, 0.5, 0.0),
        (20, 1, 0.2, 0.9, 0.1),
        (25, 2, 0.1, 0.3, 0.5),
        (30, 2, 0.2, 0.6, 0.8),
    ]
    df = pd.DataFrame(rows, columns=["step", "stage", "acc_a", "acc_b", "acc_c"])
    df = df.sample(frac=1, random_state=0)  # row order must not matter
    m = toy.accuracy_matrix(df, ["a", "b", "c"])
    assert list(m.index) == ["a", "b", "c"] and list(m.columns) == ["a", "b", "c"]
    np.testing.assert_allclose(m.to_numpy(), [[1.0, 0.0, 0.0], [0.2, 0.9, 0.1], [0.2, 0.6, 0.8]])


def test_replay_buffer_cycles_bos_tokens_and_uses_each_row_once():
    def fake_sampler(params, prompt, key):  # rows = prompt, then a per-key counter
        n = prompt.shape[0]
        fill = jax.random.randint(key, (n, toy.T - 1), 0, 10**6)
        return jnp.concatenate([prompt, fill], axis=1)

    buf = toy_train.ReplayBuffer(fake_sampler, None, ("add", "sort"), rows=4, buffer=3, key=jax.random.key(0))
    batches = [np.asarray(buf.batch(s)) for s in range(6)]
    assert all(set(b[:, 0]) == {toy.TASKS["add"].bos, toy.TASKS["sort"].bos} for b in batches)
    bodies = {tuple(r[1:]) for b in batches for r in b}
    assert len(bodies) == 24  # 6 steps x 4 rows, all distinct: two refills, no row reused


def test_load_config_is_strict():
    with pytest.raises(config_lib.ConfigError, match="steps_per_task"):
        toy_train.load_config({"steps_per_tsk": 3})
    with pytest.raises(config_lib.ConfigError, match="opt.lr"):
        toy_train.load_config({"opt": {"lrr": 1e-3}})
    with pytest.raises(config_lib.ConfigError, match="tasks"):
        toy_train.load_config({"tasks": ["add", "multiply"]})


@pytest.mark.parametrize("scale", ["quick", "paper"])
def test_shipped_parameter_files_load(scale):
    raw = yaml.safe_load((ROOT / "params" / scale / "toy_continual.yaml").read_text())
    assert raw["notebook"] == "figures/toy_continual"
    cfg = toy_train.load_config(raw["config"])
    assert cfg.tasks == toy.PAPER_TASKS and cfg.model.V == toy.V


def test_tiny_sequential_run_with_replay(tmp_path):
    results = toy_train.compare_replay(TINY, tmp_path)
    for name, result in results.items():
        summary = runs.read_summary(tmp_path / name)
        assert summary["status"] == "finished"
        assert np.asarray(summary["accuracy_matrix"]).shape == (2, 2)
        assert result.matrix().shape == (2, 2)
        config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert config["tasks"] == ["add", "sort"]
    df = runs.load_runs(tmp_path)
    assert set(df["run"]) == {"standard", "ntp_self"}
    assert len(df) == 2 * (1 + 2 * 2)  # initial evaluation + two per task
    replay = df[df["run"] == "ntp_self"]
    assert (replay[replay["stage"] == 1]["train_reg"] > 0).all()
    assert (df[df["run"] == "standard"]["train_reg"].fillna(0) == 0).all()
    assert replay["sample_time_s"].iloc[-1] > 0
    # a finished run with the same config is reused, not retrained
    before = (tmp_path / "ntp_self" / runs.METRICS).read_text()
    toy_train.compare_replay(TINY, tmp_path)
    assert (tmp_path / "ntp_self" / runs.METRICS).read_text() == before


def test_notebook_runs_with_tiny_parameters(tmp_path):
    from forgetting_lib.experiments import notebooks

    out = notebooks.run_notebook(
        ROOT / "notebooks" / "figures" / "toy_continual.ipynb",
        {"config": TINY, "out_dir": str(tmp_path / "runs")},
        tmp_path,
        cwd=ROOT,
    )
    assert out.is_file()
    assert runs.is_finished(tmp_path / "runs" / "ntp_self")
    assert runs.is_finished(tmp_path / "runs" / "standard")
