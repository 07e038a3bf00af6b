"""Plot functions: a tidy DataFrame in, one trace per run (and metric) out."""

from __future__ import annotations

import os
import shutil
import struct

import pandas as pd
import plotly.graph_objects as go
import pytest

from forgetting_lib import plots


def _runs() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run": ["a", "a", "b", "b"],
            "step": [0, 1, 0, 1],
            "tokens": [0, 10, 0, 10],
            "valid_ntp": [5.0, 4.0, 5.0, 3.5],
            "valid_ntp_h2": [4.8, 3.9, None, 3.4],
        }
    )


def test_loss_curves_one_trace_per_run():
    fig = plots.loss_curves(_runs())
    assert [t.name for t in fig.data] == ["a", "b"]
    assert list(fig.data[1].y) == [5.0, 3.5]


def test_loss_curves_several_metrics_share_a_colour_per_run():
    fig = plots.loss_curves(_runs(), y=["valid_ntp", "valid_ntp_h2"])
    assert [t.name for t in fig.data] == [
        "a: valid_ntp",
        "a: valid_ntp_h2",
        "b: valid_ntp",
        "b: valid_ntp_h2",
    ]
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    assert fig.data[0].line.dash != fig.data[1].line.dash
    assert list(fig.data[3].y) == [3.4]  # missing values are dropped per metric


def _browser() -> str | None:
    """A Chrome/Chromium kaleido can drive: $BROWSER_PATH or one on PATH."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
    return os.environ.get("BROWSER_PATH") or next(filter(None, map(shutil.which, names)), None)


def test_save_writes_html_and_a_png_of_the_requested_size(tmp_path):
    pytest.importorskip("kaleido")
    if _browser() is None:
        pytest.skip("no Chrome/Chromium for kaleido (CI installs Debian's chromium)")
    written = plots.save(plots.loss_curves(_runs()), tmp_path / "fig.html", width=640, height=360)
    assert written == [tmp_path / "fig.html", tmp_path / "fig.png"]
    head = (tmp_path / "fig.png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == (640, 360)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html", "fig.png"]  # no temp left
    fig = plots.loss_curves(_runs()).update_layout(width=700, height=300)  # the figure's own size
    plots.save(fig, tmp_path / "own")
    assert struct.unpack(">II", (tmp_path / "own.png").read_bytes()[16:24]) == (700, 300)


def test_save_without_a_png_engine_writes_html_and_warns_once(tmp_path, monkeypatch, capsys):
    def no_engine(self, *args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(go.Figure, "write_image", no_engine)
    monkeypatch.setattr(plots, "_warned_no_png", False)
    fig = plots.loss_curves(_runs())
    assert plots.save(fig, tmp_path / "a.png") == [tmp_path / "a.html"]
    assert plots.save(fig, tmp_path / "b") == [tmp_path / "b.html"]
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("warning: figures are saved as HTML only")
    assert "Kaleido requires Google Chrome" in err and "apt-get install chromium" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html"]
