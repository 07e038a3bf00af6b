"""The explorer panel without a browser: the config each control setting builds, the Run handler
(a trace per run, extended with the run's metrics rows; the table of finished runs), refusing a
second Run while one trains, failures and a missing parent shown in the status line, and the
diagnostics of the rows a self-generated run replayed.

Runs finetune the shared tiny parent of finetune_fixtures (D=32, L=2, V=64, T=32, 8-row batches).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from forgetting_lib import methods, runs
from forgetting_lib.engine import diagnostics
from forgetting_lib.experiments import explorer as widgets
from forgetting_lib.experiments.explorer import Explorer, Settings

from finetune_fixtures import B, T, world  # noqa: F401

STEPS = 8
BUDGET = STEPS * B * T


@pytest.fixture
def explorer(world, tmp_path):
    return Explorer(world.child_config(), tmp_path / "explore", budgets=(BUDGET, 2 * BUDGET), evals_per_run=4)


EXPECTED = {  # method -> (reg.method, lora.rank, reads replay rows, strength applies)
    "none": ("none", 0, False, False),
    "KL": ("kl_pre", 0, True, True),
    "NTP": ("ntp_pre", 0, True, True),
    "replace": ("replace", 0, True, True),
    "LoRA": ("none", 16, False, False),
    "EWC": ("ewc", 0, True, True),
    "L2-SP": ("l2sp", 0, False, True),
}


def test_every_method_is_tested():
    assert set(EXPECTED) == set(methods.families())


@pytest.mark.parametrize("source", ["real", "self-generated"])
@pytest.mark.parametrize("method", list(EXPECTED))
def test_config_from_controls(explorer, method, source):
    explorer.lr.value, explorer.method.value, explorer.source.value = 3e-4, method, source
    explorer.coeff.value, explorer.fraction.value = 10.0, 0.25
    explorer.budget.value = 2 * BUDGET
    cfg = explorer.build_config()
    reg_method, rank, replays, strength = EXPECTED[method]
    assert cfg.reg.method == reg_method and cfg.lora.rank == rank
    assert cfg.opt.lr == pytest.approx(3e-4, rel=1e-6)
    assert cfg.stop.num_tokens_train == 2 * BUDGET
    assert cfg.log.every_tokens == 2 * BUDGET // 4 and cfg.log.progress is False
    if replays:
        assert cfg.reg.synth is (source == "self-generated")
    if strength:
        assert cfg.reg.coeff == (0.25 if method == "replace" else 10.0)
    assert cfg.model.load_path == str(explorer.base.model.load_path)
    # controls that do not apply are greyed out / hidden
    assert explorer.source.disabled is not replays
    assert explorer.coeff.disabled is not strength
    assert (explorer.fraction.layout.display != "none") is (method == "replace")
    assert (explorer.coeff.layout.display != "none") is (method != "replace")
    assert explorer.lr.layout.display != "none" and explorer.budget.layout.display != "none"


def test_labels_and_folder_names_are_distinct():
    a = Settings(lr=1e-3, method="KL", source="real", coeff=1.0, fraction=0.25, tokens=100)
    b = Settings(lr=1e-3, method="KL", source="self-generated", coeff=1.0, fraction=0.25, tokens=100)
    assert a.label() == "KL real lr=1e-03 c=1" and a.slug() != b.slug()
    assert "/" not in b.slug() and " " not in b.slug()
    with pytest.raises(ValueError, match="unknown method"):
        Settings(lr=1e-3, method="kl", source="real", coeff=1, fraction=0, tokens=1).overrides()


def test_run_streams_a_trace_and_fills_the_table(explorer):
    explorer.lr.value, explorer.method.value, explorer.coeff.value = 1e-3, "KL", 3.0
    assert explorer.on_run() is True
    assert len(explorer.figure.data) == 1
    assert explorer.wait(timeout=180), "run did not finish"
    assert explorer.error is None, explorer.error
    run_dir = next((explorer.out_dir).iterdir())
    assert run_dir.name.startswith("001-KL_real")
    rows = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    trace = explorer.figure.data[0]
    assert list(trace.x) == [r["valid_ntp"] for r in rows]
    assert list(trace.y) == [r["prev_ntp"] for r in rows]
    assert [tuple(c) for c in trace.customdata] == [(r["step"], r["tokens"]) for r in rows]
    table = explorer.table_frame()
    assert len(table) == 1 and table["method"][0] == "KL" and table["source"][0] == "real"
    assert table["forgetting"][0] == pytest.approx(rows[-1]["forgetting"])
    assert table["new-task loss"][0] == pytest.approx(rows[-1]["valid_ntp"])
    assert run_dir.name in explorer.table.value and "forgetting" in explorer.table.value
    assert "Finished" in explorer.status.value

    # a second run adds a second trace and keeps the first one intact
    explorer.method.value = "none"
    assert explorer.on_run() is True and explorer.wait(timeout=180)
    assert len(explorer.figure.data) == 2 and list(explorer.figure.data[0].x) == list(trace.x)
    assert len(explorer.figure.data[1].x) == len(rows)
    assert len(explorer.table_frame()) == 2
    assert sorted(p.name[:3] for p in explorer.out_dir.iterdir()) == ["001", "002"]


def test_self_generated_run_shows_the_diagnostics_of_its_replayed_rows(explorer):
    explorer.method.value, explorer.source.value = "NTP", "self-generated"
    assert explorer.on_run() is True and explorer.wait(timeout=180)
    assert explorer.error is None, explorer.error
    run_dir = next(explorer.out_dir.iterdir())
    expected = diagnostics.run_diagnostics(run_dir)
    np.testing.assert_equal(explorer.diagnostics, {run_dir.name: expected})  # NaN == NaN here
    frame = explorer.diagnostics_frame()
    assert frame[run_dir.name]["classified as old data"] == expected["id_old_fraction"]
    assert (
        "unigram JS to real" in explorer.diagnostics_table.value
        and run_dir.name in explorer.diagnostics_table.value
    )
    assert "Finished" in explorer.status.value and "No diagnostics" not in explorer.status.value
    explorer.source.value = "real"  # real rows: no diagnostics column is added
    assert explorer.on_run() is True and explorer.wait(timeout=180)
    assert list(explorer.diagnostics) == [run_dir.name]


def test_second_run_while_training_is_refused(explorer, monkeypatch):
    release, started = threading.Event(), threading.Event()

    def slow_training(cfg, out_dir, *, on_eval):
        started.set()
        on_eval({"step": 0, "tokens": 0, "valid_ntp": 4.0, "prev_ntp": 1.0})
        release.wait(30)
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(widgets, "train_and_evaluate", slow_training)
    assert explorer.on_run() is True and started.wait(30)
    assert explorer.running
    assert explorer.on_run() is False
    assert "Refused" in explorer.status.value and "not queued" in explorer.status.value
    assert len(explorer.figure.data) == 1  # no trace for the refused run
    release.set()
    assert explorer.wait(timeout=30)
    # a failure is shown, recorded, and does not block the next run
    assert isinstance(explorer.error, RuntimeError) and "failed" in explorer.status.value
    assert explorer.table_frame()["stop"][0] == "error"
    assert list(explorer.figure.data[0].x) == [4.0]


def test_missing_parent_says_how_to_make_it(world, tmp_path):
    panel = Explorer(world.child_config(), tmp_path / "explore", parent=tmp_path / "nothing")
    assert panel.run_button.disabled and "make quickstart" in panel.status.value
    assert "make quickstart" in panel._repr_mimebundle_()["text/plain"]  # papermill sees it too
    assert panel.on_run() is False and not panel.figure.data
    panel = Explorer(world.child_config(), tmp_path / "explore", data_path=tmp_path / "es.bin")
    assert panel.problem and "es.bin" in panel.problem


def test_invalid_settings_are_reported(explorer):
    explorer.method.value = "replace"
    explorer.fraction.max = explorer.fraction.value = 1.0  # replacing every row is not allowed
    assert explorer.on_run() is False and "Invalid settings" in explorer.status.value
    assert "reg.coeff" in explorer.status.value and not explorer.figure.data
