"""The interactive learning-rate / replay explorer: ipywidgets controls that start small finetuning
runs and stream each run's (new-data loss, old-data loss) trajectory into a plotly FigureWidget.

Everything the panel does is a plain method, so tests drive it without a browser:
`Explorer.settings()` reads the controls, `Settings.overrides()` / `Explorer.build_config()` turn
them into a validated run config, `Explorer.on_run()` is the Run button's handler and
`Explorer.on_eval(index, row)` extends trace `index` with one metrics row. Training itself is the
library's `train_and_evaluate`; this module only chooses its config and watches its rows.

Runs are not queued: one run trains at a time in a background thread (so the controls stay
responsive), and pressing Run while it trains is refused with a status message.

After a run that replayed self-generated rows, the panel shows the diagnostics of the rows it
replayed (`engine.diagnostics.run_diagnostics`: the parent's loss on them, their divergence from
real old rows, id-conditioning), one column per such run, in `Explorer.diagnostics`.
"""

from __future__ import annotations

import html
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from .. import config as config_lib, methods, plots, runs
from ..engine import diagnostics as diagnostics_lib, regularisers
from ..engine.train import RunResult, train_and_evaluate

SOURCES = (methods.REAL, methods.SELF)  # replay sources offered (reg.synth false / true)
BUDGETS = (16_384, 32_768, 65_536, 131_072, 262_144)  # token budgets offered (training tokens)
TABLE_COLUMNS = {
    "run": "run",
    "method": "method",
    "source": "source",
    "lr": "lr",
    "strength": "coeff / fraction",
    "tokens": "tokens",
    "stop_reason": "stop",
    "valid_ntp": "new-task loss",
    "prev_ntp": "old-task loss",
    "forgetting": "forgetting",
    "train_time_s": "train s",
}
DIAGNOSTIC_ROWS = {  # run_diagnostics key -> row title of the diagnostics table
    "parent_loss": "parent loss on replayed rows",
    "parent_loss_real": "parent loss on real rows",
    "unigram_js": "unigram JS to real (bits)",
    "unigram_js_floor": "  floor: real vs real",
    "bigram_js": "bigram JS to real (bits)",
    "bigram_js_floor": "  floor: real vs real",
    "distinct_2": "distinct-2",
    "duplicate_rows": "duplicate rows",
    "eos_rate": "EOS rate",
    "id_old_fraction": "classified as old data",
    "rows": "rows",
}


@dataclass(frozen=True)
class Settings:
    """One run's choices, as read from the controls."""

    lr: float  # peak finetuning learning rate
    method: str  # a method family of the method table (methods.families(): none, KL, ...)
    source: str  # a replay source (methods.REAL / methods.SELF; ignored by families without)
    coeff: float  # regulariser weight (KL, NTP, EWC, L2-SP)
    fraction: float  # replaced fraction of each batch (replace)
    tokens: int  # training-token budget

    def resolved(self) -> methods.Method:
        """The method-table entry these choices select."""
        if self.method not in methods.families() or self.source not in SOURCES:
            raise ValueError(
                f"unknown method {self.method!r} or source {self.source!r}; "
                f"methods: {', '.join(methods.families())}; sources: {', '.join(SOURCES)}"
            )
        return methods.find(self.method, self.source)

    @property
    def replays(self) -> bool:
        """Whether the method reads replay rows (so `source` applies)."""
        return self.resolved().source is not None

    @property
    def fractional(self) -> bool:
        """Whether its strength is the replaced fraction of each batch (else a loss weight)."""
        return regularisers.get(self.resolved().reg_method).coeff_is_fraction

    @property
    def strength(self) -> float | None:
        """The strength that applies: the fraction for replace, the coefficient for a loss term,
        None for methods without one (none, LoRA)."""
        if not regularisers.get(self.resolved().reg_method).uses_coeff:
            return None
        return self.fraction if self.fractional else self.coeff

    def overrides(self, evals_per_run: int = 8) -> dict[str, Any]:
        """Dotted config overrides for this run (evaluating `evals_per_run` times)."""
        out = {
            **self.resolved().overrides,
            "opt.lr": float(self.lr),
            "stop.num_tokens_train": int(self.tokens),
            "log.every_tokens": max(1, int(self.tokens) // evals_per_run),
            "log.progress": False,
        }  # the status line reports progress; no bar from a thread
        if self.strength is not None:
            out["reg.coeff"] = float(self.strength)
        return out

    def label(self) -> str:
        """Short human-readable name, e.g. `KL self-generated lr=1e-03 c=1`."""
        parts = [self.method] + ([self.source] if self.replays else [])
        parts.append(f"lr={self.lr:.0e}")
        if self.strength is not None:
            parts.append(f"{'frac' if self.fractional else 'c'}={self.strength:g}")
        return " ".join(parts)

    def slug(self) -> str:
        """The label as a folder-name fragment."""
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{self.label()} {self.tokens}tok").strip("_")


def parent_problem(parent: str | Path, data_path: str | Path) -> str | None:
    """Why runs cannot start (missing parent run or token file) and how to fix it; None if they can."""
    if not runs.is_finished(parent):
        return (
            f"The parent run {parent} does not exist or has not finished. Create it with "
            f"`make quickstart` (or `python -m forgetting_lib quickstart`), then re-run this cell."
        )
    if not Path(data_path).is_file():
        return (
            f"The new-data token file {data_path} does not exist. `make quickstart` writes "
            f"outputs/quickstart/data/es.bin; or make one with `python -m forgetting_lib binarize`."
        )
    return None


class Explorer:
    """The panel: controls, Run button, status line, live trade-off figure, table of finished runs.

    `base` is a finetuning parameter file (or mapping / Config); `parent` and `data_path` override
    its `model.load_path` and `data.path`; each run writes `out_dir/<counter>-<settings>/`.
    """

    def __init__(
        self,
        base: str | Path | Mapping[str, Any] | config_lib.Config,
        out_dir: str | Path,
        *,
        parent: str | Path | None = None,
        data_path: str | Path | None = None,
        overrides: Sequence[str] = (),
        lr: float = 1e-3,
        budgets: Sequence[int] = BUDGETS,
        budget: int | None = None,
        evals_per_run: int = 8,
    ):
        extra = list(overrides)
        if parent is not None:
            extra.append(("model.load_path", str(parent)))
        if data_path is not None:
            extra.append(("data.path", str(data_path)))
        if isinstance(base, config_lib.Config):  # replace, not a dict round trip: keeps which keys were set
            self.base = base.replace(dict(config_lib.parse_override(o) for o in extra))
        else:
            self.base = config_lib.load(base, extra)
        self.out_dir = Path(out_dir)
        self.evals_per_run = evals_per_run
        self.results: list[dict[str, Any]] = []  # one record per finished (or failed) run
        self.diagnostics: dict[str, dict[str, float]] = {}  # run folder name -> its replay rows' diagnostics
        self._references: dict[tuple[str, str], Any] = {}  # (parent, data) -> diagnostics.OldReference
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the last run's exception, if it raised
        self._current = ""  # folder name of the run that trains now (or trained last)
        self._lock = threading.Lock()  # guards the figure, which the worker thread updates
        self._build_controls(lr, list(budgets), budget)
        self.problem = parent_problem(self.base.model.load_path, self.base.data.path)
        if self.problem:
            self.run_button.disabled = True
            self._status(self.problem, "error")

    # ---- widgets -------------------------------------------------------------------------------

    def _build_controls(self, lr: float, budgets: list[int], budget: int | None) -> None:
        style = {"description_width": "120px"}

        def wide() -> W.Layout:  # one Layout per control: hiding one must not hide the others
            return W.Layout(width="420px")

        self.lr = W.FloatLogSlider(
            value=lr,
            base=10,
            min=-5,
            max=-1,
            step=0.1,
            readout_format=".1e",
            description="learning rate",
            style=style,
            layout=wide(),
        )
        self.method = W.Dropdown(
            options=methods.families(), value="none", description="replay method", style=style, layout=wide()
        )
        self.source = W.ToggleButtons(
            options=list(SOURCES), value="real", description="replay source", style=style
        )
        self.coeff = W.FloatLogSlider(
            value=1.0,
            base=10,
            min=-2,
            max=3,
            step=0.25,
            description="coefficient",
            style=style,
            layout=wide(),
        )
        self.fraction = W.FloatSlider(
            value=0.25,
            min=0.05,
            max=0.9,
            step=0.05,
            description="replay fraction",
            style=style,
            layout=wide(),
        )
        self.budget = W.Dropdown(
            options=[(f"{b:,} tokens", b) for b in budgets],
            value=budget if budget is not None else budgets[0],
            description="token budget",
            style=style,
            layout=wide(),
        )
        self.run_button = W.Button(
            description="Run",
            button_style="primary",
            icon="play",
            tooltip="finetune from the parent with these settings",
        )
        self.run_button.on_click(self.on_run)
        self.status = W.HTML()
        self.table = W.HTML()
        self.diagnostics_table = W.HTML()
        self.figure = go.FigureWidget(
            plots.tradeoff(
                pd.DataFrame(columns=["run", "step", "tokens", "valid_ntp", "prev_ntp"]),
                title="English (old) loss vs Spanish (new) loss, live",
            )
        )
        self.figure.update_layout(height=480, showlegend=True, legend=dict(font=dict(size=10)))
        self.method.observe(lambda _: self._sync_controls(), names="value")
        self._sync_controls()
        self._status("Choose settings and press Run.")
        controls = W.VBox(
            [
                self.lr,
                self.method,
                self.source,
                self.coeff,
                self.fraction,
                self.budget,
                W.HBox([self.run_button, self.status]),
            ]
        )
        self.widget = W.VBox([controls, self.figure, self.table, self.diagnostics_table])

    def _sync_controls(self) -> None:
        """Show the strength control that applies to the chosen method; grey out unused ones."""
        s = self.settings()
        self.source.disabled = not s.replays
        self.coeff.layout.display = "none" if s.fractional else None
        self.fraction.layout.display = None if s.fractional else "none"
        self.coeff.disabled = s.strength is None

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The panel; where widgets do not render (papermill output, a terminal) the status line."""
        bundle = self.widget._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = f"Explorer writing runs to {self.out_dir}: {self.message}"
        return bundle

    def _status(self, text: str, kind: str = "info") -> None:
        self.message = text
        colour = {"info": "#444", "busy": "#b35900", "error": "#b00020", "done": "#1b5e20"}[kind]
        self.status.value = f'<span style="color:{colour}">{html.escape(text)}</span>'

    # ---- logic (plain methods: tests call them directly) ---------------------------------------

    def settings(self) -> Settings:
        return Settings(
            lr=float(self.lr.value),
            method=self.method.value,
            source=self.source.value,
            coeff=float(self.coeff.value),
            fraction=float(self.fraction.value),
            tokens=int(self.budget.value),
        )

    def build_config(self, settings: Settings | None = None) -> config_lib.Config:
        """The validated run config for `settings` (default: the controls' current values)."""
        s = settings or self.settings()
        return self.base.replace(s.overrides(self.evals_per_run) | {"run.name": s.slug()})

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def on_run(self, _button: Any = None) -> bool:
        """Start a run with the current settings in a background thread; False if refused."""
        if self.problem:
            self._status(self.problem, "error")
            return False
        if self.running:
            self._status(
                f"Refused: run '{self._current}' is still training. Runs are not queued; "
                f"press Run again when it has finished.",
                "busy",
            )
            return False
        settings = self.settings()
        try:
            cfg = self.build_config(settings)
        except config_lib.ConfigError as err:
            self._status(f"Invalid settings: {err}", "error")
            return False
        run_dir = self._new_run_dir(settings)
        with self._lock:
            self.figure.add_trace(
                go.Scatter(
                    x=[],
                    y=[],
                    mode="lines+markers",
                    name=f"{len(self.figure.data) + 1}: {settings.label()}",
                    customdata=[],
                    hovertemplate="step %{customdata[0]}<br>tokens %{customdata[1]:,}"
                    "<br>new %{x:.3f}<br>old %{y:.3f}",
                )
            )
            index = len(self.figure.data) - 1
        self._current, self.error = run_dir.name, None
        self._status(f"Starting {run_dir.name} (compiling)...", "busy")
        self.thread = threading.Thread(
            target=self._train,
            args=(settings, cfg, run_dir, index),
            name=f"explorer-{run_dir.name}",
            daemon=True,
        )
        self.thread.start()
        return True

    def on_eval(self, index: int, row: Mapping[str, Any]) -> None:
        """Append one metrics row (new-data loss x, old-data loss y) to trace `index`."""
        with self._lock, self.figure.batch_update():
            trace = self.figure.data[index]
            trace.x = tuple(trace.x or ()) + (row["valid_ntp"],)
            trace.y = tuple(trace.y or ()) + (row["prev_ntp"],)
            trace.customdata = tuple(map(tuple, trace.customdata or ())) + ((row["step"], row["tokens"]),)
        self._status(
            f"Training {self._current}: step {row['step']}, {row['tokens']:,} tokens, "
            f"new-task loss {row['valid_ntp']:.3f}, old-task loss {row['prev_ntp']:.3f}",
            "busy",
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current run ends (True) or `timeout` seconds pass (False)."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running

    def table_frame(self) -> pd.DataFrame:
        """The finished runs, one row each, with the table's column titles."""
        frame = pd.DataFrame(self.results, columns=list(TABLE_COLUMNS))
        return frame.rename(columns=TABLE_COLUMNS)

    # ---- internals ------------------------------------------------------------------------------

    def _new_run_dir(self, settings: Settings) -> Path:
        """out_dir/<NNN>-<settings>: the counter continues after runs of earlier sessions."""
        taken = [
            int(m.group(1))
            for p in (self.out_dir.iterdir() if self.out_dir.is_dir() else ())
            if (m := re.match(r"(\d+)-", p.name))
        ]
        return self.out_dir / f"{max(taken, default=0) + 1:03d}-{settings.slug()}"

    def _train(self, settings: Settings, cfg: config_lib.Config, run_dir: Path, index: int) -> None:
        """The worker thread: train, then record the result (or the error) in the table."""
        try:
            result = train_and_evaluate(cfg, run_dir, on_eval=lambda row: self.on_eval(index, row))
        except Exception as err:  # noqa: BLE001 - shown in the panel; the thread must not die silently
            self.error = err
            self._record(settings, run_dir, None)
            self._status(f"Run {run_dir.name} failed: {type(err).__name__}: {err}", "error")
            return
        self._record(settings, run_dir, result)
        kind = "done" if result.status == "finished" else "error"
        message = (
            f"Finished {run_dir.name}: {result.status} ({result.stop_reason}) after {result.tokens:,} tokens."
        )
        if settings.replays and settings.source == methods.SELF:
            self._status(f"{message} Diagnosing the rows it replayed...", "busy")
            problem = self._diagnose(run_dir)
            message, kind = (f"{message} No diagnostics: {problem}", "error") if problem else (message, kind)
        self._status(message, kind)

    def diagnostics_frame(self) -> pd.DataFrame:
        """The replay-row diagnostics of the self-generated runs: one column per run."""
        frame = pd.DataFrame(self.diagnostics).reindex(list(DIAGNOSTIC_ROWS))
        return frame.rename(index=DIAGNOSTIC_ROWS)

    def _diagnose(self, run_dir: Path) -> str | None:
        """Add the diagnostics of the rows the run replayed to the diagnostics table; returns why
        they could not be computed (None when they were)."""
        problem = None
        try:
            self.diagnostics[run_dir.name] = diagnostics_lib.run_diagnostics(run_dir, self._references)
        except Exception as err:  # noqa: BLE001 - the run stands; only its diagnostics are missing
            self.diagnostics[run_dir.name], problem = {}, f"{type(err).__name__}: {err}"
        self.diagnostics_table.value = "<b>Diagnostics of the self-generated rows each run replayed</b>" + (
            self.diagnostics_frame().to_html(na_rep="-", float_format=lambda v: f"{v:.4g}", border=0)
        )
        return problem

    def _record(self, settings: Settings, run_dir: Path, result: RunResult | None) -> None:
        final = result.final if result is not None else {}
        record = {
            "run": run_dir.name,
            "method": settings.method,
            "source": settings.source if settings.replays else "-",
            "lr": settings.lr,
            "strength": settings.strength,
            "tokens": result.tokens if result else None,
            "stop_reason": result.stop_reason if result else "error",
            **{k: final.get(k) for k in ("valid_ntp", "prev_ntp", "forgetting", "train_time_s")},
        }
        self.results.append({k: float("nan") if v is None else v for k, v in record.items()})
        self.table.value = self.table_frame().to_html(
            index=False, na_rep="-", float_format=lambda v: f"{v:.4g}", border=0
        )
