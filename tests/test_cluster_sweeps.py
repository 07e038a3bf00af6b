"""Sweeps on a cluster: a real local Ray cluster (a worker killed mid-point, the sweep rerun to
resume it), submitit's local executor (SLURM's code path without SLURM), and the `resources:` key.

Both executors run `run_point` in the caller's working directory, so the specs here use paths
relative to a test folder, as a user's specs are relative to the project root.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from test_sweep import PRETRAIN, B, T, data  # noqa: F401 - data is a fixture (two tiny token files)

from forgetting_lib import locks, runs
from forgetting_lib.__main__ import main as cli_main, parse
from forgetting_lib.experiments import executors, sweep
from forgetting_lib.experiments.sweep import SweepError

LONG = 200 * B * T  # tokens of the point that is killed: 200 steps, a checkpoint every 20
WALL = ("wall", "time", "per_s", "path", "written_at")  # columns that differ between two runs of a point


def spec(out: str, data_path: Path, **stage) -> dict:
    """Three points of a tiny pretraining: `long` (checkpoints every 20 steps), `a` and `b`."""
    return {
        "out": out,
        "base": PRETRAIN,
        "set": {"data.path": os.path.relpath(data_path)},
        "grid": {
            "point": {
                "long": {
                    "run.seed": 2,
                    "stop.num_tokens_train": LONG,
                    "log.every_tokens": 20 * B * T,
                    "log.checkpoint_every_tokens": 20 * B * T,
                },
                "a": {"run.seed": 0},
                "b": {"run.seed": 1},
            }
        },
        **stage,
    }


def comparable(df):
    """A stage's rows without the columns that name folders or measure time."""
    keep = [c for c in df.columns if not any(w in c for w in WALL)]
    return df[keep].sort_values(["run", "step"]).reset_index(drop=True)


@pytest.fixture
def ray_executor():
    """A Ray cluster on this machine (2 CPUs; Ray binds it to this machine's own address, as it
    turns 127.0.0.1 into that), shut down after the test."""
    pytest.importorskip("ray")
    executor = executors.RayExecutor("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield executor
    executor.shutdown()
    import ray

    assert not ray.is_initialized()


def kill_after_first_checkpoint(run_dir: Path, killed: dict, deadline_s: float = 120.0) -> None:
    """SIGKILL the process training `run_dir` (the holder of its lock) once its first checkpoint
    is written; records the pid and the checkpoint's step in `killed`."""
    deadline = time.monotonic() + deadline_s
    while not (run_dir / runs.CHECKPOINT / "meta.json").exists():
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    holder = locks.read_holder(run_dir / runs.LOCK) or {}
    if holder.get("pid") in (None, os.getpid()):  # the point must be training on a worker
        return
    killed["step"] = json.loads((run_dir / runs.CHECKPOINT / "meta.json").read_text())["tracker"]["step"]
    killed["pid"] = holder["pid"]
    os.kill(holder["pid"], signal.SIGKILL)


@pytest.mark.slow
def test_ray_worker_killed_mid_point_fails_it_and_a_rerun_resumes_it(
    ray_executor, data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # relative paths: they must resolve on the workers as here
    ray_spec = spec("ray", data["old"], resources={"cpus": 1})
    long_dir = tmp_path / "ray" / "runs" / "point=long"
    killed: dict = {}
    killer = threading.Thread(target=kill_after_first_checkpoint, args=(long_dir, killed))
    killer.start()
    try:
        table = sweep.run_sweep(ray_spec, notebook=False, executor=ray_executor, log=lambda _: None)
    finally:
        killer.join()
    assert killed, "the long point never checkpointed on a worker"
    table = table.set_index("point")
    assert table.loc["point=long", "status"] == "failed"
    assert "WorkerCrashedError" in table.loc["point=long", "error"], table.loc["point=long", "error"]
    assert list(table.loc[["point=a", "point=b"], "status"]) == ["finished", "finished"]
    assert not runs.is_finished(long_dir)
    kept = [r for r in runs.read_metrics(long_dir) if r["step"] <= killed["step"]]

    rerun = sweep.run_sweep(ray_spec, notebook=False, executor=ray_executor, log=lambda _: None)
    assert list(rerun["status"]) == ["finished", "done", "done"]
    metrics = runs.read_metrics(long_dir)
    assert metrics[: len(kept)] == kept  # resumed from the checkpoint: the rows before it are untouched
    assert [r["step"] for r in metrics] == list(range(0, LONG // (B * T) + 1, 20))

    local = sweep.run_sweep(spec("local", data["old"]), notebook=False, log=lambda _: None)
    assert list(local["status"]) == ["finished"] * 3
    assert rerun["valid_ntp"].tolist() == local["valid_ntp"].tolist()  # the final metrics, exactly
    on_ray, here = (comparable(sweep.load_stage(s, "runs")) for s in (ray_spec, spec("local", data["old"])))
    assert len(on_ray) == len(here) == 3 + 3 + 11
    assert on_ray.equals(here), on_ray.compare(here) if on_ray.shape == here.shape else on_ray.columns


@pytest.mark.slow
def test_submitit_local_executor_runs_a_sweep_into_the_same_folders(data, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.chdir(tmp_path)
    two = spec("slurm", data["old"], resources={"cpus": 1, "time_min": 10, "partition": "cpu"})
    two["grid"]["point"].pop("long")
    with executors.SlurmExecutor("submitit", cluster="local") as executor:
        table = sweep.run_sweep(two, notebook=False, executor=executor, log=lambda _: None)
        assert list(table["status"]) == ["finished", "finished"]
        assert runs.is_finished(tmp_path / "slurm" / "runs" / "point=a")
        assert list((tmp_path / "submitit").glob("*_result.pkl"))  # the jobs' own files
        again = sweep.run_sweep(two, notebook=False, executor=executor, log=lambda _: None)
    assert list(again["status"]) == ["done", "done"]
    assert len(sweep.load_stage(two, "runs")) == 2 * 3
    recorded = json.loads((tmp_path / "slurm" / "sweep.json").read_text())["points"]
    assert {r["status"] for r in recorded} == {"done"}


def test_slurm_and_ray_parameters_follow_the_points_resources(tmp_path):
    pytest.importorskip("submitit")
    executor = executors.SlurmExecutor(
        tmp_path, cluster="local", partition="cpu", additional_parameters={"account": "lab", "qos": "low"}
    )
    resources = {
        "gpus": 1,
        "cpus": 8,
        "memory_gb": 64,
        "time_min": 90.5,
        "partition": "gpu",
        "slurm": {"qos": "high", "constraint": "h100"},
    }
    params = executor.parameters_for(resources, "finetune/lr=0.001")
    assert {k: v for k, v in params.items() if k != "slurm_setup"} == {
        "name": "finetune/lr=0.001",
        "timeout_min": 91,
        "gpus_per_node": 1,
        "cpus_per_task": 8,
        "tasks_per_node": 1,
        "nodes": 1,
        "mem_gb": 64,
        "slurm_partition": "gpu",
        "slurm_additional_parameters": {"account": "lab", "qos": "high", "constraint": "h100"},
    }
    default = executor.parameters_for({})
    assert default["slurm_partition"] == "cpu" and default["timeout_min"] == 240
    assert executors.RayExecutor.options(resources) == {"num_cpus": 8, "num_gpus": 1, "memory": 64 * 2**30}
    assert executors.RayExecutor.options({}) == {"num_cpus": 1, "num_gpus": 0}


def test_resources_are_carried_to_the_points_and_ignored_by_the_local_runner(tmp_path, data):
    two = spec(str(tmp_path), data["old"], resources={"gpus": 1, "memory_gb": 2.5})
    points = sweep.plan(two)
    assert {p.resources for p in points} == {(("gpus", 1), ("memory_gb", 2.5))}
    assert "resources" not in json.dumps(points[0].config().to_dict())  # not part of a run's config
    staged = {"out": str(tmp_path), "stages": {"a": {"base": PRETRAIN, "resources": {"cpus": 2}}}}
    assert sweep.plan(staged)[0].resources == (("cpus", 2),)


@pytest.mark.parametrize(
    "resources, message",
    [
        ({"gpu": 1}, r"unknown resources key 'gpu'; valid: gpus, cpus, memory_gb, time_min, partition"),
        ({"gpus": -1}, r"resources.gpus must be an integer >= 0"),
        ({"cpus": 1.5}, r"resources.cpus must be an integer >= 1"),
        ({"memory_gb": "64G"}, r"resources.memory_gb must be a number > 0"),
        ({"time_min": True}, r"resources.time_min must be"),
        ({"slurm": ["--exclusive"]}, r"resources.slurm must be a mapping"),
        ([{"gpus": 1}], r"`resources` must be a mapping"),
    ],
)
def test_bad_resources_are_rejected_naming_the_key(resources, message):
    with pytest.raises(SweepError, match=message):
        sweep.plan({"out": "o", "stages": {"pretrain": {"base": {}, "resources": resources}}})


def test_cli_chooses_the_executor_and_a_missing_package_names_the_fix(tmp_path, data, monkeypatch, capsys):
    args = parse(["sweep", "s.yaml", "--executor", "ray", "--address", "auto"])
    assert (args.executor, args.address) == ("ray", "auto")
    assert parse(["sweep", "s.yaml"]).executor == "local"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the cluster extra were not installed
    with pytest.raises(executors.ClusterError, match=r"pip install 'forgetting_lib\[cluster\]'"):
        executors.RayExecutor()
    path = tmp_path / "spec.json"  # JSON is YAML
    path.write_text(json.dumps(spec(str(tmp_path / "out"), data["old"])))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["sweep", str(path), "--executor", "ray", "--no-notebook"])
    assert exit_info.value.code == 2
    assert "forgetting_lib[cluster]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran
