"""One run over many devices and processes (engine/sharding.py), on forced CPU host devices.

The runs happen in processes of their own (tests/mesh_worker.py): JAX fixes its device count at
start-up. Measured: the largest difference of any metric at any evaluation between a mesh run
and the one-device run is 4e-6 for pretraining, 5e-5 for a self-generated-KL finetune (2 x 4
mesh), 1.1e-4 with tensor parallelism (2 x 2 x 2) and 1.9e-4 over 2 processes x 2 devices: float
sums in another order, amplified over 16 Adam steps. We allow 5e-4.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from forgetting_lib import config as config_lib, runs
from forgetting_lib.engine import sharding, train
from forgetting_lib.engine.sharding import MeshError, Placement, fsdp_spec

import mesh_worker

WORKER = Path(mesh_worker.__file__)
TOLERANCE = 5e-4  # any metric (losses in nats) at any evaluation


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return {**env, **extra}


@pytest.fixture(scope="module")
def mesh_report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mesh")
    subprocess.run([sys.executable, str(WORKER), "mesh", str(root)], env=_env(8), check=True, timeout=600)
    return json.loads((root / "mesh.json").read_text())


@pytest.mark.slow
def test_mesh_runs_match_one_device(mesh_report):
    # pretraining, a KL finetune on self-generated replay, a LoRA finetune on real replay
    for run in ("parent", "child", "lora"):
        assert mesh_report[f"{run}_diff"] <= TOLERANCE, (run, mesh_report)
    for run in ("parent", "child"):  # on a data 2 x fsdp 2 x tensor 2 mesh
        assert mesh_report[f"{run}_tensor_diff"] <= TOLERANCE, (run, mesh_report)
    # the sampler split over the mesh draws exactly the one-device rows
    assert mesh_report["replay_rows_equal"]
    # a Hugging Face parent (GQA, tied embeddings) on data 2 x fsdp 2 x tensor 2, its replay rows
    # prompted by its chat template
    assert mesh_report["hf"]["diff"] <= TOLERANCE and mesh_report["hf"]["replay_rows_equal"], mesh_report[
        "hf"
    ]


@pytest.mark.slow
def test_mesh_leaves_are_sharded_and_stay_so(mesh_report):
    placement = mesh_report["placement"]
    assert placement["devices"] == 8
    for name, leaf in placement["leaves"].items():
        shape, shard = leaf["shape"], leaf["shard"]
        if any(n % 8 == 0 for n in shape):  # split 8 ways along its first such dimension
            axis = next(i for i, n in enumerate(shape) if n % 8 == 0)
            assert shard[axis] * 8 == shape[axis] and "fsdp" in leaf["spec"], (name, leaf)
        else:
            assert shard == shape, (name, leaf)
    assert placement["step_keeps_shardings"]
    assert placement["batch_spec"] == "P(('data', 'fsdp'), None)"
    assert placement["opt_mu_spec"] == "P('fsdp',)"


@pytest.mark.slow
def test_tensor_parallel_splits_heads_mlp_and_vocabulary(mesh_report):
    placement = mesh_report["tensor_placement"]  # data 2 x fsdp 2 x tensor 2
    specs = {name.split("'")[-2]: leaf["spec"] for name, leaf in placement["leaves"].items()}
    assert specs == {
        "qkv": "P('fsdp', None, 'tensor')",  # [D, 3, N, H]: heads over tensor
        "out": "P('tensor', 'fsdp')",  # [N, H, D]
        "up": "P('fsdp', 'tensor')",  # [D, F]: MLP width over tensor
        "down": "P('tensor', 'fsdp')",  # [F, D]
        "embed": "P('fsdp',)",  # [V, D]
        "unembed": "P('fsdp', 'tensor')",  # [D, V]: vocabulary over tensor
    }
    assert placement["step_keeps_shardings"]


@pytest.mark.slow
def test_sharded_state_checkpoints_and_resumes_on_another_mesh(mesh_report):
    resume = mesh_report["resume"]  # killed after its step-20 checkpoint on 1 x 8, resumed on 2 x 4
    assert resume["checkpoint_step"] == 20 and resume["status"] == "finished"
    assert resume["diff"] <= TOLERANCE


@pytest.mark.slow
def test_fit_check_of_a_sharded_config_reports_per_device_memory(mesh_report):
    """`fit` on a config with `mesh:` compiles it sharded: an eighth of the FLOPs per device (up
    to what stays replicated) and less memory than on one device."""
    (one_bytes, eight_bytes), (one_flops, eight_flops) = mesh_report["fit"].values()
    assert eight_bytes < one_bytes
    assert 1.0 <= 8 * eight_flops / one_flops < 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost_match_one_device(tmp_path):
    """2 processes x 2 CPU devices, coordinated by jax.distributed over loopback (gloo)."""
    old, new = mesh_worker.data(tmp_path)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "hosts", str(tmp_path)],
            env=_env(
                2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    report = json.loads((tmp_path / "hosts.json").read_text())
    assert (report["processes"], report["devices"]) == (2, 4)
    assert report["statuses"] == ["finished"] * 5 and report["stop_reasons"][-1] == "train_time_s"
    # the same runs on this process's single device
    world = mesh_worker.ff.World(tmp_path / "one" / "parent", old, new)
    train.train_and_evaluate(mesh_worker.parent_config(old, {}), tmp_path / "one" / "parent")
    for run, extra in (("child", {}), ("real", mesh_worker.REAL), ("ewc", mesh_worker.EWC)):
        cfg = mesh_worker.child_config(world, world.parent, {}, **extra)
        train.train_and_evaluate(cfg, tmp_path / "one" / run)
    # kept replay rows are written once, as on one device
    assert (
        runs.read_replay_rows(tmp_path / "real") == runs.read_replay_rows(tmp_path / "one" / "real")
    ).all()
    steps = [r["step"] for r in runs.read_metrics(tmp_path / "timed")]  # one row per evaluation
    assert steps[:-1] == list(range(0, len(steps) * 4 - 4, 4)) and steps[-1] == report["steps"][-1]
    for run in ("parent", "child", "real", "ewc"):
        one = mesh_worker.losses(tmp_path / "one" / run)
        assert mesh_worker.max_abs_diff(report[run], one) <= TOLERANCE, run
        # process 0 alone wrote: one row per evaluation, a summary, a loadable checkpoint
        steps = [row["step"] for row in runs.read_metrics(tmp_path / run)]
        assert steps == [row["step"] for row in runs.read_metrics(tmp_path / "one" / run)]
        assert runs.is_finished(tmp_path / run)


def test_tensor_split_that_does_not_divide_names_the_array():
    from jax.tree_util import DictKey

    with pytest.raises(MeshError, match=r"mesh.tensor=3 does not divide dimension 2 of \['qkv'\]"):
        sharding.param_spec((DictKey("qkv"),), (32, 3, 2, 16), 1, 3)
    assert sharding.param_spec((DictKey("embed"),), (64, 32), 2, 2) == sharding.P("fsdp")


def test_fsdp_spec_splits_the_first_divisible_dimension():
    assert fsdp_spec((32, 3, 2, 16), 8) == sharding.P("fsdp")
    assert fsdp_spec((2, 16, 32), 8) == sharding.P(None, "fsdp")
    assert fsdp_spec((3, 5), 4) == sharding.P()
    assert fsdp_spec((), 4) == sharding.P()
    assert fsdp_spec((64, 64), 1) == sharding.P()


def test_default_mesh_places_nothing_and_bad_meshes_name_the_fix():
    assert sharding.make_mesh(config_lib.MeshConfig()) is None
    assert Placement().tree({"w": 1}) is None and Placement().batch_devices == 1
    with pytest.raises(
        MeshError, match=r"mesh.data=2 x mesh.fsdp=2 x mesh.tensor=1 = 4 devices, but this process sees 1"
    ):
        sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=2))
    with pytest.raises(config_lib.ConfigError, match="mesh.data"):
        config_lib.from_dict({"stop": {"num_tokens_train": 1000}}, [("mesh.data", 0)])
    with pytest.raises(config_lib.ConfigError, match="mesh.data"):
        config_lib.from_dict({"stop": {"num_tokens_train": 1000}}, [("mesh.data", -1), ("mesh.fsdp", -1)])


def test_a_mesh_is_not_part_of_a_runs_identity(tmp_path):
    """A run may resume on another mesh (the same computation, float sums in another order)."""
    cfg = config_lib.from_dict({"stop": {"num_tokens_train": 1000}})
    runs.write_config(tmp_path, cfg.to_dict())
    (tmp_path / runs.METRICS).write_text('{"step": 0}\n')
    moved = cfg.replace({"mesh.fsdp": 8, "log.progress": False})
    assert runs.prepare_run_dir(moved.to_dict(), tmp_path, resume=True, overwrite=False) == "resume"
