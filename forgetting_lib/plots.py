"""Pure plotting functions: a tidy DataFrame (from `runs.load_runs`) in, a plotly Figure out.

`save` writes a figure as self-contained HTML (viewable offline) and, where the static-image engine
works (kaleido driving a system Chrome/Chromium), as PNG too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd
import plotly.colors
import plotly.graph_objects as go

_warned_no_png = False  # `save` warns once per session when no PNG engine works


def loss_curves(
    df: pd.DataFrame,
    *,
    y: str | Sequence[str] = "valid_ntp",
    x: str = "tokens",
    title: str = "Validation loss",
) -> go.Figure:
    """One line per run and metric: each `y` column (nats/token) against `x` (tokens by default).

    With several metrics (e.g. `["valid_ntp", "valid_ntp_h2"]`) a run keeps one colour and each
    metric gets its own dash style.
    """
    ys = [y] if isinstance(y, str) else list(y)
    colours = plotly.colors.qualitative.Plotly
    fig = go.Figure()
    for i, (run, frame) in enumerate(df.groupby("run", sort=False)):
        for dash, col in zip(("solid", "dot", "dash", "dashdot"), ys):
            part = frame.dropna(subset=[col]).sort_values(x)
            fig.add_trace(
                go.Scatter(
                    x=part[x],
                    y=part[col],
                    mode="lines+markers",
                    name=str(run) if len(ys) == 1 else f"{run}: {col}",
                    line=dict(color=colours[i % len(colours)], dash=dash),
                )
            )
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=f"{ys[0] if len(ys) == 1 else 'loss'} (nats/token)",
        template="plotly_white",
        legend_title="run",
    )
    return fig


def tradeoff(
    df: pd.DataFrame,
    *,
    x: str = "valid_ntp",
    y: str = "prev_ntp",
    title: str = "Learning the new data vs. forgetting the old",
) -> go.Figure:
    """Old-data loss (y) against new-data loss (x) along each finetuning run; the start is marked.

    Runs move right-to-left as they learn the new data; the lower a trajectory stays, the less
    the run forgets.
    """
    fig = go.Figure()
    for run, frame in df.groupby("run", sort=False):
        frame = frame.sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=frame[x],
                y=frame[y],
                mode="lines+markers",
                name=str(run),
                customdata=frame[["step", "tokens"]],
                hovertemplate="step %{customdata[0]}<br>tokens %{customdata[1]:,}"
                "<br>new %{x:.3f}<br>old %{y:.3f}",
            )
        )
    if len(df):
        start = df.sort_values("step").iloc[0]
        fig.add_trace(
            go.Scatter(
                x=[start[x]],
                y=[start[y]],
                mode="markers",
                name="start",
                marker=dict(symbol="star", size=14, color="black"),
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title=f"new-data loss {x} (nats/token)",
        yaxis_title=f"old-data loss {y} (nats/token)",
        template="plotly_white",
    )
    fig.update_xaxes(autorange="reversed")
    return fig


def save(
    fig: go.Figure, path: str | Path, *, width: int | None = None, height: int | None = None
) -> list[Path]:
    """Write `path` as self-contained .html and, where a static engine works, the same name as a
    `width` x `height` .png (default: the figure's own layout size, else 900 x 500); returns the
    paths written.

    The PNG engine is kaleido (a project dependency), which drives a Chrome/Chromium it finds on
    PATH, at the usual install paths (e.g. Debian's /usr/bin/chromium) or at $BROWSER_PATH. Where
    none works, the HTML alone is the figure and one stderr line per session says what to install.
    """
    global _warned_no_png
    path = Path(path).with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True)
    written = [path]
    png = path.with_suffix(".png")
    tmp = png.with_name(f".{png.stem}.{os.getpid()}.tmp.png")
    try:
        fig.write_image(
            tmp,
            format="png",
            width=width or fig.layout.width or 900,
            height=height or fig.layout.height or 500,
        )
        os.replace(tmp, png)  # atomic: a reader never sees a half-written PNG
        written.append(png)
    except Exception as err:  # noqa: BLE001 - no kaleido/Chromium: HTML alone is the figure
        tmp.unlink(missing_ok=True)
        if not _warned_no_png:  # one line per session, not a warning with its source line
            _warned_no_png = True
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
            print(
                f"warning: figures are saved as HTML only ({reason}); for PNGs too, install Chromium "
                f"(apt-get install chromium, or run plotly_get_chrome, or set BROWSER_PATH to a "
                f"Chrome binary) and rerun",
                file=sys.stderr,
                flush=True,
            )
    return written
