"""Analysis on hand-made run tables whose answers can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from forgetting_lib.figures import analysis


def _run(name: str, valid, prev=None, *, steps=None, tokens=None, time=None, **config) -> pd.DataFrame:
    """One run's rows as `load_runs` would give them (config keys use __ for dots)."""
    n = len(valid)
    steps = list(range(n)) if steps is None else steps
    frame = pd.DataFrame(
        {
            "run": name,
            "step": steps,
            "valid_ntp": valid,
            "tokens": [100 * s for s in steps] if tokens is None else tokens,
            "train_time_s": [10.0 * s for s in steps] if time is None else time,
            "status": "finished",
            "stop_reason": "tokens",
            "experiment": "exp",
            "path": f"outputs/exp/{name}",
        }
    )
    if prev is not None:
        frame["prev_ntp"] = prev
        frame["forgetting"] = np.asarray(prev, dtype=float) - config.get("parent__final_valid_ntp", 1.0)
    for key, value in config.items():
        frame[key.replace("__", ".")] = value
    return frame


def _df(*runs: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(runs, ignore_index=True)


# ---- at_target ---------------------------------------------------------------------------------


def test_at_target_interpolates_at_the_exact_crossing():
    df = _df(_run("a", [4.0, 3.0, 2.0, 1.0], [1.0, 1.2, 1.6, 2.0], parent__final_valid_ntp=1.0, opt__lr=0.1))
    row = analysis.at_target(df, 2.5).loc["a"]
    # 2.5 is halfway from 3.0 (step 1) to 2.0 (step 2)
    assert row["step"] == pytest.approx(1.5)
    assert row["tokens"] == pytest.approx(150)
    assert row["train_time_s"] == pytest.approx(15.0)
    assert row["prev_ntp"] == pytest.approx(1.4)
    assert row["forgetting"] == pytest.approx(0.4)
    assert row["valid_ntp"] == 2.5 and row["reached"]
    assert row["opt.lr"] == 0.1 and row["status"] == "finished" and row["stop_reason"] == "tokens"


def test_at_target_uses_the_first_crossing_not_a_later_one():
    df = _df(_run("a", [4.0, 2.0, 3.0, 1.0], [1.0, 1.4, 1.8, 2.0]))
    row = analysis.at_target(df, 2.5).loc["a"]
    # (4 - 2.5) / (4 - 2) = 0.75 of the way from step 0 to step 1
    assert row["step"] == pytest.approx(0.75)
    assert row["prev_ntp"] == pytest.approx(1.3)


def test_at_target_reads_rows_in_step_order():
    ordered = _run("a", [4.0, 3.0, 2.0, 1.0], [1.0, 1.2, 1.6, 2.0])
    shuffled = ordered.iloc[[2, 0, 3, 1]]
    pd.testing.assert_frame_equal(analysis.at_target(shuffled, 2.5), analysis.at_target(ordered, 2.5))


def test_at_target_never_reached_and_already_below():
    df = _df(_run("never", [4.0, 3.5], [1.0, 1.1]), _run("below", [2.0, 1.5], [1.3, 1.5]))
    table = analysis.at_target(df, 2.5)
    assert list(table.index) == ["never", "below"]
    assert not table.loc["never", "reached"]
    assert table.loc["never", ["prev_ntp", "tokens", "step", "valid_ntp"]].isna().all()
    below = table.loc["below"]
    assert below["reached"] and below["step"] == 0 and below["prev_ntp"] == 1.3
    assert below["valid_ntp"] == 2.5


def test_at_target_exactly_on_an_evaluation_takes_that_evaluation():
    row = analysis.at_target(_run("a", [4.0, 3.0, 2.0], [1.0, 1.2, 1.6]), 3.0).loc["a"]
    assert row["step"] == 1 and row["prev_ntp"] == 1.2


def test_at_target_skips_evaluations_without_the_new_loss():
    df = _run("a", [4.0, np.nan, 2.0], [1.0, 9.0, 1.6])
    row = analysis.at_target(df, 3.0).loc["a"]
    assert row["step"] == pytest.approx(1.0)  # halfway from step 0 to step 2
    assert row["prev_ntp"] == pytest.approx(1.3)


# ---- at_best -----------------------------------------------------------------------------------


def test_at_best_takes_the_earliest_of_tied_minima():
    df = _run("a", [3.0, 2.0, 2.0, 2.5], [1.0, 1.1, 1.5, 1.7])
    row = analysis.at_best(df).loc["a"]
    assert row["step"] == 1 and row["valid_ntp"] == 2.0 and row["prev_ntp"] == 1.1


def test_at_best_per_run():
    df = _df(_run("a", [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]), _run("b", [3.0, 2.5], [1.0, 1.5]))
    table = analysis.at_best(df, columns=["tokens"])
    assert table["tokens"].to_dict() == {"a": 100, "b": 100}
    assert table["valid_ntp"].to_dict() == {"a": 1.0, "b": 2.5}


# ---- forgetting_table --------------------------------------------------------------------------


def test_forgetting_table_at_target_with_best_fallback():
    df = _df(
        _run("hit", [4.0, 3.0, 2.0], [1.0, 1.2, 1.6], parent__final_valid_ntp=0.9),
        _run("miss", [4.0, 3.0, 2.8], [1.0, 1.1, 1.3], parent__final_valid_ntp=0.9),
    )
    table = analysis.forgetting_table(df, 2.5)
    hit, miss = table.loc["hit"], table.loc["miss"]
    assert hit["reached"] and hit["at"] == "target"
    assert hit["new_loss"] == 2.5 and hit["old_loss"] == pytest.approx(1.4)
    assert hit["forgetting"] == pytest.approx(0.5) and hit["baseline"] == 0.9
    assert hit["steps"] == pytest.approx(1.5) and hit["tokens"] == pytest.approx(150)
    assert hit["train_time_s"] == pytest.approx(15.0)
    assert not miss["reached"] and miss["at"] == "best"
    assert miss["new_loss"] == 2.8 and miss["forgetting"] == pytest.approx(0.4) and miss["steps"] == 2


def test_forgetting_table_without_target_is_at_best():
    df = _run("a", [4.0, 2.0, 3.0], [1.0, 1.5, 1.2], parent__final_valid_ntp=1.0)
    row = analysis.forgetting_table(df).loc["a"]
    assert row["at"] == "best" and not row["reached"]
    assert row["new_loss"] == 2.0 and row["forgetting"] == pytest.approx(0.5)


def test_forgetting_table_baseline_falls_back_to_the_first_old_loss():
    missing = _run("missing", [4.0, 2.0], [1.05, 1.25])  # no baseline column
    nan = _run("nan", [4.0, 2.0], [1.0, 1.5], parent__final_valid_ntp=np.nan)
    assert analysis.forgetting_table(missing).loc["missing", "forgetting"] == pytest.approx(0.2)
    assert analysis.forgetting_table(nan).loc["nan", "forgetting"] == pytest.approx(0.5)


def test_forgetting_table_leaves_out_pretraining_runs():
    pre = _run("pre", [8.0, 4.0])
    pre["prev_ntp"] = np.nan
    df = _df(pre, _run("ft", [4.0, 2.0], [1.0, 1.5], parent__final_valid_ntp=1.0))
    assert list(analysis.forgetting_table(df).index) == ["ft"]
    with pytest.raises(ValueError, match="no finetuning run"):
        analysis.forgetting_table(pre)


# ---- compute multiplier ------------------------------------------------------------------------

PRETRAIN = _run("pre", [8.0, 6.0, 4.0, 3.0], tokens=[0, 100, 200, 400])


@pytest.mark.parametrize(
    "old_loss, expected",
    [
        (5.0, 150 / 400),  # halfway from 6 (100 tokens) to 4 (200 tokens)
        (6.0, 100 / 400),
        (3.0, 1.0),  # reached only at the final evaluation
        (2.5, 1.0),  # below the final loss: nothing forgotten
        (8.0, 0.0),  # at the initial loss: everything forgotten
        (9.0, 0.0),
    ],
)
def test_compute_multiplier(old_loss, expected):
    assert analysis.compute_multiplier(PRETRAIN, old_loss) == pytest.approx(expected)


def test_compute_multiplier_is_zero_at_or_above_the_first_loss_even_after_tokens():
    late = _run("late", [8.0, 6.0, 4.0], tokens=[100, 200, 400])  # first evaluation after 100 tokens
    assert analysis.compute_multiplier(late, 8.0) == 0.0
    assert analysis.compute_multiplier(late, 7.0) == pytest.approx(150 / 400)


def test_compute_multiplier_needs_exactly_one_run():
    with pytest.raises(ValueError, match="exactly one.*pre, other"):
        analysis.compute_multiplier(_df(PRETRAIN, _run("other", [8.0, 4.0])), 5.0)


# ---- lr x steps, times -------------------------------------------------------------------------


def test_lr_times_steps_is_constant_when_steps_scale_as_one_over_lr():
    table = pd.DataFrame(
        {"opt.lr": [1e-3, 2e-3, 4e-3], "steps": [800.0, 400.0, 200.0]},
        index=pd.Index(["a", "b", "c"], name="run"),
    )
    product = analysis.lr_times_steps(table)
    assert np.allclose(product, 0.8) and list(product.index) == ["a", "b", "c"]
    table.loc["c", "steps"] = 300.0
    assert not np.allclose(analysis.lr_times_steps(table), 0.8)


def test_time_to_target_and_first_below():
    df = _df(
        _run("a", [4.0, 3.0, 2.0], [2.0, 1.5, 1.0], time=[0.0, 10.0, 30.0]), _run("b", [4.0, 3.5], [2.0, 1.9])
    )
    to_target = analysis.time_to_target(df, 2.5)  # halfway from 3.0 (10 s) to 2.0 (30 s)
    assert to_target["a"] == pytest.approx(20.0) and math.isnan(to_target["b"])
    below = analysis.first_below(df, 1.25)  # the old loss halfway from 1.5 (10 s) to 1.0 (30 s)
    assert below["a"] == pytest.approx(20.0) and math.isnan(below["b"])
    assert analysis.time_to_target(df, 3.0, time="tokens")["a"] == 100


# ---- pareto frontier ---------------------------------------------------------------------------


def test_pareto_frontier():
    table = pd.DataFrame(
        {"x": [3.0, 1.0, 2.0, 4.0, 5.0, 2.0, np.nan], "y": [4.0, 5.0, 3.0, 1.0, 1.0, 3.0, 0.0]},
        index=["d", "a", "b", "c", "e", "b2", "nan"],
    )
    frontier = analysis.pareto_frontier(table, "x", "y")
    assert list(frontier.index) == ["a", "b", "b2", "c"]  # equal rows do not dominate each other


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda df: analysis.at_target(df, 2.5),
        lambda df: analysis.at_best(df),
        lambda df: analysis.forgetting_table(df),
        lambda df: analysis.time_to_target(df, 2.5),
        lambda df: analysis.first_below(df, 2.5),
    ],
)
def test_missing_column_is_named(call):
    df = _run("a", [4.0, 3.0]).drop(columns="train_time_s")
    df["prev_ntp"], df["forgetting"] = 1.0, 0.0
    with pytest.raises(
        ValueError,
        match=r"(at_target|at_best|forgetting_table|time_to_target|first_below)"
        r" needs column\(s\) 'train_time_s'",
    ):
        call(df)


def test_empty_dataframe_and_missing_config_column_are_errors():
    with pytest.raises(ValueError, match="at_best: the DataFrame is empty"):
        analysis.at_best(pd.DataFrame())
    with pytest.raises(ValueError, match="lr_times_steps needs column.*'opt.lr'"):
        analysis.lr_times_steps(pd.DataFrame({"steps": [1.0]}))


def test_same_run_name_in_two_folders_is_an_error():
    other = _run("a", [4.0, 2.0], [1.0, 1.2])
    other["path"] = "outputs/other/a"
    with pytest.raises(ValueError, match="several run folders"):
        analysis.at_best(_df(_run("a", [4.0, 3.0], [1.0, 1.1]), other))


# ---- properties --------------------------------------------------------------------------------

losses = st.lists(st.floats(0.0, 10.0), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(valid=losses, seed=st.integers(0, 2**32 - 1), target=st.floats(0.0, 10.0))
def test_interpolated_values_lie_between_the_bracketing_evaluations(valid, seed, target):
    prev = np.random.default_rng(seed).normal(size=len(valid))
    row = analysis.at_target(_run("a", valid, prev), target).loc["a"]
    below = [i for i, v in enumerate(valid) if v <= target]
    assert row["reached"] == bool(below)
    if below:
        i = below[0]
        lo, hi = (i, i) if i == 0 else (i - 1, i)
        assert lo <= row["step"] <= hi
        assert min(prev[lo], prev[hi]) - 1e-9 <= row["prev_ntp"] <= max(prev[lo], prev[hi]) + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    drops=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=10),
    a=st.floats(0.0, 12.0),
    b=st.floats(0.0, 12.0),
)
def test_compute_multiplier_lies_in_0_1_and_falls_as_old_loss_rises(drops, a, b):
    curve = 10.0 - np.cumsum([0.0, *drops])  # a non-increasing pretraining curve
    pre = _run("pre", list(curve), tokens=[50 * (i + 1) for i in range(len(curve))])
    low, high = sorted((a, b))
    m_low, m_high = analysis.compute_multiplier(pre, low), analysis.compute_multiplier(pre, high)
    assert 0.0 <= m_high <= m_low <= 1.0


@settings(max_examples=200, deadline=None)
@given(points=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=15))
def test_pareto_frontier_rows_are_undominated_and_dominate_the_rest(points):
    table = pd.DataFrame(points, columns=["x", "y"], index=[f"r{i}" for i in range(len(points))])
    frontier = analysis.pareto_frontier(table, "x", "y")

    def dominates(p, q):
        return p[0] <= q[0] and p[1] <= q[1] and p != q

    pts = list(table.itertuples(index=False, name=None))
    kept = list(frontier.itertuples(index=False, name=None))
    assert all(not dominates(p, q) for q in kept for p in pts)
    assert all(any(dominates(p, q) for p in kept) for q in pts if q not in kept)
    assert list(frontier["x"]) == sorted(frontier["x"])
