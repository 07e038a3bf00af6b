"""Plot functions: a tidy DataFrame in, one trace per run (and metric) out."""

from __future__ import annotations

import pandas as pd

from forgetting_lib import plots


def _runs() -> pd.DataFrame:
    return pd.DataFrame({"run": ["a", "a", "b", "b"], "step": [0, 1, 0, 1], "tokens": [0, 10, 0, 10],
                         "valid_ntp": [5.0, 4.0, 5.0, 3.5], "valid_ntp_h2": [4.8, 3.9, None, 3.4]})


def test_loss_curves_one_trace_per_run():
    fig = plots.loss_curves(_runs())
    assert [t.name for t in fig.data] == ["a", "b"]
    assert list(fig.data[1].y) == [5.0, 3.5]


def test_loss_curves_several_metrics_share_a_colour_per_run():
    fig = plots.loss_curves(_runs(), y=["valid_ntp", "valid_ntp_h2"])
    assert [t.name for t in fig.data] == ["a: valid_ntp", "a: valid_ntp_h2", "b: valid_ntp", "b: valid_ntp_h2"]
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    assert fig.data[0].line.dash != fig.data[1].line.dash
    assert list(fig.data[3].y) == [3.4]  # missing values are dropped per metric
