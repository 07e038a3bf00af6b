"""The sweep runner: spec validation, stable point ids, resume, failures, notebook and CLI modes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgetting_lib import runs
from forgetting_lib.__main__ import main as cli_main
from forgetting_lib.experiments import sweep
from forgetting_lib.experiments.sweep import SweepError

from tokenfiles import write_token_file

ROOT = Path(__file__).resolve().parents[1]
V, T, B = 64, 16, 4

PRETRAIN = {
    "model": {"D": 32, "L": 1, "H": 16, "V": V, "dtype": "float32"},
    "data": {"T": T, "batch_size": B, "valid_tokens": 8 * T, "microbatch_rows": B},
    "opt": {"lr": 3e-3, "warmup_tokens": 0},
    "stop": {"num_tokens_train": 6 * B * T},
    "log": {"every_tokens": 3 * B * T, "progress": False},
}
FINETUNE = {
    "data": {"T": T, "batch_size": B, "valid_tokens": 8 * T, "microbatch_rows": B},
    "opt": {"lr": 3e-3, "warmup_tokens": 0},
    "reg": {"coeff": 1.0, "replay_batch_size": 2, "buffer": 2},
    "stop": {"num_tokens_train": 4 * B * T},
    "log": {"every_tokens": 2 * B * T, "progress": False},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep_data")
    return {
        "old": write_token_file(root / "old.bin", 4000, vocab_size=V, dataset_token=1, seed=0),
        "new": write_token_file(root / "new.bin", 4000, vocab_size=V, dataset_token=2, seed=1),
    }


def two_stage(out: Path, data: dict[str, Path], *, methods: dict | None = None) -> dict:
    return {
        "out": str(out),
        "stages": {
            "pretrain": {
                "base": PRETRAIN,
                "set": {"data.path": str(data["old"])},
                "grid": {"opt.lr": [1e-3, 3e-3]},
            },
            "finetune": {
                "base": FINETUNE,
                "after": "pretrain",
                "set": {"data.path": str(data["new"])},
                "grid": {
                    "method": methods
                    or {
                        "plain": {"reg.method": "none"},
                        "kl_self": {"reg.method": "kl_pre", "reg.synth": True},
                    }
                },
            },
        },
    }


def test_points_have_stable_readable_ids_and_parents(tmp_path, data):
    points = sweep.plan(two_stage(tmp_path, data))
    assert [(p.stage, p.id, p.parent) for p in points] == [
        ("pretrain", "lr=0.001", None),
        ("pretrain", "lr=0.003", None),
        ("finetune", "lr=0.001__method=plain", "lr=0.001"),
        ("finetune", "lr=0.001__method=kl_self", "lr=0.001"),
        ("finetune", "lr=0.003__method=plain", "lr=0.003"),
        ("finetune", "lr=0.003__method=kl_self", "lr=0.003"),
    ]
    assert points == sweep.plan(two_stage(tmp_path, data))  # same spec, same points
    ft = points[3]
    assert ft.out_dir == tmp_path / "finetune" / "lr=0.001__method=kl_self"
    overrides = dict(ft.overrides)
    assert overrides["model.load_path"] == str(tmp_path / "pretrain" / "lr=0.001")
    assert overrides["reg.method"] == "kl_pre" and overrides["reg.synth"] is True
    assert ft.config().run.name == ft.id and ft.config().run.experiment == "finetune"
    assert points[1].config().opt.lr == 3e-3


def test_single_stage_spec_and_figure_file_wrapper(tmp_path, data):
    flat = {"out": str(tmp_path), "base": PRETRAIN, "grid": {"opt.lr": [1e-3], "model.D": [16, 32]}}
    assert [p.id for p in sweep.plan(flat)] == ["lr=0.001__D=16", "lr=0.001__D=32"]
    assert {p.stage for p in sweep.plan(flat)} == {"runs"}
    assert sweep.plan({"out": str(tmp_path), "base": PRETRAIN})[0].id == "base"
    path = tmp_path / "figure.yaml"
    path.write_text(yaml.safe_dump({"notebook": "figures/x", "sweep": flat}, sort_keys=False))
    assert [p.id for p in sweep.plan(path)] == ["lr=0.001__D=16", "lr=0.001__D=32"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"stages": {}}, "`out`"),
        ({"out": "o", "stages": {"a": {"set": {}}}}, "needs `base`"),
        ({"out": "o", "stages": {"a": {"base": {}, "gird": {}}}}, "gird"),
        ({"out": "o", "stages": {"a": {"base": {}, "grid": {"lr": [1, 2]}}}}, "dotted config key"),
        ({"out": "o", "stages": {"a": {"base": {}, "grid": {"opt.lr": []}}}}, "non-empty"),
        ({"out": "o", "stages": {"a": {"base": {}, "after": "b"}}}, "not a stage"),
        ({"out": "o", "stages": {"a": {"base": {}, "after": "b"}, "b": {"base": {}, "after": "a"}}}, "cycle"),
        ({"out": "o", "stagse": {}}, "stagse"),
        ({"out": "o", "set": {"opt.lr": 0.5}, "stages": {"a": {"base": {}}}}, "would be ignored"),
        (
            {"out": "o", "stages": {"a": {"base": {}, "grid": {"method": {"plain": "none"}}}}},
            "must map to dotted",
        ),
        ({"out": "o", "base": {}, "grid": {"opt.lr": [1e-3, 0.001]}}, "share the folder"),
        ({"out": "o", "base": {}, "grid": {"m": {"kl/self": {}, "kl self": {}}}}, "share the folder"),
    ],
)
def test_bad_specs_are_rejected_with_the_key(spec, message):
    with pytest.raises(SweepError, match=message):
        sweep.plan(spec)


def test_axes_sharing_a_short_name_keep_their_full_keys_and_floats_keep_every_digit(tmp_path):
    spec = {
        "out": str(tmp_path),
        "base": PRETRAIN,
        "grid": {
            "data.valid_tokens": [128, 256],
            "mix.valid_tokens": [64],
            "opt.lr": [1.0000001e-3, 1.0000002e-3],
        },
    }
    points = sweep.plan(spec)
    assert points[0].id == "data.valid_tokens=128__mix.valid_tokens=64__lr=0.0010000001"
    assert len({p.out_dir for p in points}) == 4
    assert dict(points[3].labels) == {
        "data.valid_tokens": "256",
        "mix.valid_tokens": "64",
        "lr": "0.0010000002",
    }


def test_a_typo_in_a_point_config_fails_before_any_training(tmp_path, data):
    spec = two_stage(tmp_path, data, methods={"bad": {"reg.methd": "none"}})
    with pytest.raises(SweepError, match=r"finetune/lr=0.001__method=bad.*did you mean reg.method"):
        sweep.run_sweep(spec, notebook=False, log=lambda _: None)
    assert not (tmp_path / "pretrain").exists()


def test_sweep_runs_resumes_and_skips_finished_points(tmp_path, data):
    spec = two_stage(tmp_path, data)
    first = sweep.run_sweep(spec, notebook=False, stages=["pretrain"], log=lambda _: None)
    assert list(first["status"]) == ["finished", "finished"]
    metrics = tmp_path / "pretrain" / "lr=0.001" / runs.METRICS
    stamp = metrics.stat().st_mtime_ns
    table = sweep.run_sweep(spec, notebook=False, log=lambda _: None)
    assert list(table["status"]) == ["done", "done", "finished", "finished", "finished", "finished"]
    assert metrics.stat().st_mtime_ns == stamp  # finished points are not retrained
    assert (table["tokens"] == [6 * B * T] * 2 + [4 * B * T] * 4).all()
    assert table["forgetting"].iloc[2:].notna().all() and table["forgetting"].iloc[:2].isna().all()
    recorded = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert [r["status"] for r in recorded] == list(table["status"])
    again = sweep.run_sweep(spec, notebook=False, log=lambda _: None)
    assert set(again["status"]) == {"done"}
    df = runs.load_runs(tmp_path / "finetune")
    assert set(df["run"]) == {p.id for p in sweep.plan(spec) if p.stage == "finetune"}


def test_a_failed_point_is_recorded_blocks_its_children_and_is_retried(tmp_path, data):
    spec = two_stage(tmp_path, data, methods={"plain": {"reg.method": "none"}})
    missing = tmp_path / "missing.bin"
    spec["stages"]["pretrain"]["grid"] = {"data.path": [str(data["old"]), str(missing)]}
    table = sweep.run_sweep(spec, notebook=False, log=lambda _: None).set_index("point")
    bad = next(p for p in table.index if p.startswith("path=") and "missing" in p and "__" not in p)
    assert table.loc[bad, "status"] == "failed" and "missing.bin" in table.loc[bad, "error"]
    assert "Traceback" in (tmp_path / "pretrain" / bad / "error.txt").read_text()
    assert table.loc[f"{bad}__method=plain", "status"] == "blocked"
    good = next(p for p in table.index if p.startswith("path=") and "old.bin" in p and "__" not in p)
    assert table.loc[good, "status"] == "finished"
    assert table.loc[f"{good}__method=plain", "status"] == "finished"
    write_token_file(missing, 4000, vocab_size=V, dataset_token=1, seed=2)  # fix the input
    retried = sweep.run_sweep(spec, notebook=False, log=lambda _: None).set_index("point")
    assert (
        retried.loc[bad, "status"] == "finished"
        and retried.loc[f"{bad}__method=plain", "status"] == "finished"
    )
    assert not (tmp_path / "pretrain" / bad / "error.txt").exists()


def test_a_changed_spec_does_not_silently_reuse_a_finished_point_or_its_children(tmp_path, data):
    spec = two_stage(tmp_path, data, methods={"plain": {"reg.method": "none"}})
    spec["stages"]["pretrain"]["grid"] = {"opt.lr": [3e-3]}
    assert set(sweep.run_sweep(spec, notebook=False, log=lambda _: None)["status"]) == {"finished"}
    assert len(sweep.load_stage(spec, "finetune")) > 0
    spec["stages"]["pretrain"]["set"]["opt.warmup_tokens"] = 64  # the parent's config changes
    table = sweep.run_sweep(spec, notebook=False, log=lambda _: None).set_index("stage")
    assert table.loc["pretrain", "status"] == "failed"
    assert (
        "opt.warmup_tokens" in table.loc["pretrain", "error"] and "delete" in table.loc["pretrain", "error"]
    )
    assert table.loc["finetune", "status"] == "blocked"  # not run (or reported) on the stale parent
    only_children = sweep.run_sweep(spec, notebook=False, stages=["finetune"], log=lambda _: None)
    assert list(only_children["status"]) == ["blocked"]
    assert sweep.load_stage(spec, "finetune").empty and sweep.load_stage(spec, "pretrain").empty  # stale
    assert len(sweep.load_stage(spec, "pretrain", finished_only=False)) > 0
    assert sweep.stage_status(spec, "finetune") == {"finished": 0, "points": 1}
    recorded = {r["stage"]: r["status"] for r in json.loads((tmp_path / "sweep.json").read_text())["points"]}
    assert recorded == {"pretrain": "failed", "finetune": "blocked"}  # merged across invocations


def test_a_killed_sweep_resumes_where_it_stopped(tmp_path, data):
    """SIGKILL the sweep CLI while its second point trains (after that point's first checkpoint):
    rerunning the spec keeps the first point, resumes the second from its checkpoint."""
    long = {
        **PRETRAIN,
        "stop": {"num_tokens_train": 300 * B * T},
        "log": {"every_tokens": 20 * B * T, "checkpoint_every_tokens": 20 * B * T, "progress": False},
    }
    spec = {
        "out": str(tmp_path),
        "base": long,
        "set": {"data.path": str(data["old"])},
        "grid": {"run.seed": [0, 1]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    second = tmp_path / "runs" / "seed=1"
    child = subprocess.Popen(
        [sys.executable, "-m", "forgetting_lib", "sweep", str(tmp_path / "spec.yaml"), "--no-notebook"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while not (second / runs.CHECKPOINT / "meta.json").exists():
            assert child.poll() is None, child.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "the second point never checkpointed"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert runs.is_finished(tmp_path / "runs" / "seed=0") and not runs.is_finished(second)
    recorded = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert [(r["point"], r["status"]) for r in recorded] == [("seed=0", "finished")]
    resumed_from = json.loads((second / runs.CHECKPOINT / "meta.json").read_text())["tracker"]["step"]
    assert resumed_from > 0
    table = sweep.run_sweep(spec, notebook=False, log=lambda _: None)
    assert list(table["status"]) == ["done", "finished"]
    steps = [r["step"] for r in runs.read_metrics(second)]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 300  # continued, not restarted


class InOrderExecutor:
    """A minimal non-concurrent.futures executor (the interface a cluster executor offers)."""

    class Job:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    def __init__(self):
        self.submitted = 0

    def submit(self, fn, *args, **kwargs):
        self.submitted += 1
        return self.Job(fn(*args, **kwargs))


class LosingExecutor(InOrderExecutor):
    """Its first job is lost (as when a cluster scheduler kills it)."""

    class Lost:
        def result(self):
            raise RuntimeError("job killed by the scheduler")

    def submit(self, fn, *args, **kwargs):
        return (
            self.Lost()
            if self.submitted == 0 and not setattr(self, "submitted", 1)
            else super().submit(fn, *args, **kwargs)
        )


def test_a_point_lost_by_the_executor_is_recorded_and_the_others_finish(tmp_path, data):
    spec = {
        "out": str(tmp_path),
        "base": PRETRAIN,
        "set": {"data.path": str(data["old"])},
        "grid": {"run.seed": [0, 1]},
    }
    table = sweep.run_sweep(spec, notebook=False, executor=LosingExecutor(), log=lambda _: None)
    assert list(table["status"]) == ["failed", "finished"]
    assert "job killed by the scheduler" in table.loc[0, "error"]


def test_ctrl_c_cancels_the_points_not_started(tmp_path, data, monkeypatch):
    import threading

    started = []

    def slow(point, *, notebook):
        started.append(point.id)
        time.sleep(1.0)
        return {
            "stage": point.stage,
            "point": point.id,
            "out_dir": str(point.out_dir),
            "status": "finished",
            "seconds": 1.0,
        }

    monkeypatch.setattr(sweep, "run_point", slow)
    spec = {"out": str(tmp_path), "base": PRETRAIN, "grid": {"run.seed": list(range(8))}}
    timer = threading.Timer(0.25, signal.raise_signal, (signal.SIGINT,))  # Ctrl-C in the main thread
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(spec, notebook=True, workers=2, log=lambda _: None)
    finally:
        timer.cancel()
    time.sleep(2.5)  # the two running points end; nothing else may start
    assert 2 <= len(started) <= 4, started


def test_an_unknown_stage_is_an_error(tmp_path, data):
    with pytest.raises(SweepError, match="no stage pretrian.*pretrain, finetune"):
        sweep.run_sweep(two_stage(tmp_path, data), stages=["pretrian"], log=lambda _: None)


def test_points_can_run_on_any_executor_and_in_parallel_processes(tmp_path, data):
    spec = {
        "out": str(tmp_path / "a"),
        "base": PRETRAIN,
        "set": {"data.path": str(data["old"])},
        "grid": {"run.seed": [0, 1]},
    }
    executor = InOrderExecutor()
    assert set(sweep.run_sweep(spec, notebook=False, executor=executor, log=lambda _: None)["status"]) == {
        "finished"
    }
    assert executor.submitted == 2
    spec["out"] = str(tmp_path / "b")
    table = sweep.run_sweep(spec, notebook=False, workers=2, log=lambda _: None)
    assert set(table["status"]) == {"finished"}
    a, b = (runs.load_runs(tmp_path / x) for x in "ab")  # same points, same results, any executor
    assert a.set_index(["run", "step"])["valid_ntp"].to_dict() == pytest.approx(
        b.set_index(["run", "step"])["valid_ntp"].to_dict(), rel=1e-5
    )


def test_notebook_mode_keeps_the_executed_notebook_as_the_points_log(tmp_path, data):
    spec = {
        "out": str(tmp_path),
        "base": PRETRAIN,
        "set": {"data.path": str(data["old"])},
        "grid": {"run.seed": [0, 1]},
    }
    table = sweep.run_sweep(spec, workers=2, log=lambda _: None)  # two kernels at once
    assert list(table["status"]) == ["finished", "finished"]
    executed = tmp_path / "runs" / "seed=0" / "train_run.ipynb"
    outputs = json.dumps([c.get("outputs") for c in json.loads(executed.read_text())["cells"]])
    assert "num_tokens_train" in outputs and "valid_ntp" in outputs  # the summary and the curves
    assert (
        runs.is_finished(tmp_path / "runs" / "seed=1")
        and (tmp_path / "runs" / "seed=1" / "train_run.ipynb").is_file()
    )


def test_cli_dry_run_lists_points_and_a_failure_exits_nonzero(tmp_path, data, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(two_stage(tmp_path / "out", data), sort_keys=False))
    assert cli_main(["sweep", str(spec), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pretrain/lr=0.001 -> ") and sum(" -> " in line for line in lines) == 6
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {"out": str(tmp_path / "bad"), "base": PRETRAIN, "set": {"data.path": str(tmp_path / "nope.bin")}}
        )
    )
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(bad), "--no-notebook"])
    assert exit_info.value.code == 1
    assert cli_main(["sweep", str(tmp_path / "absent.yaml")]) == 2


SHIPPED = [p for p in (ROOT / "params").rglob("*.yaml") if "sweep" in (yaml.safe_load(p.read_text()) or {})]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_sweep_expands_to_valid_configs(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # spec paths are relative to the project root
    points = sweep.plan(path)
    assert points
    for p in points:  # the whole config is valid (parents need not exist yet)
        p.config()
