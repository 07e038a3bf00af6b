"""Runs for tests/test_mesh.py in a process of its own: JAX must see several (forced host) devices
from its start, which the test process, with one device, cannot.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_worker.py mesh ROOT
    JAX_COORDINATOR_ADDRESS=... JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i python tests/mesh_worker.py hosts ROOT

Writes ROOT/<mode>.json (process 0) with what the test asserts on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from forgetting_lib import config as config_lib, runs
from forgetting_lib.engine import aot, assemble, checkpoint, sharding, train
from forgetting_lib.engine.finetune import resolve
from forgetting_lib.engine.sharding import Placement, make_mesh

import finetune_fixtures as ff  # the script's own folder, tests/, is on sys.path

PARENT_STEPS = 40
LOSSES = ("valid_ntp", "valid_ntp_h2", "prev_ntp", "valid_kl", "train_ntp", "train_reg", "weight_norm")


def data(root: Path) -> tuple[Path, Path]:
    old = root / "old.bin"
    new = root / "new.bin"
    if not old.exists():  # the multi-host test writes them before starting the processes
        old = ff.write_token_file(
            old, 0, vocab_size=ff.V, dataset_token=ff.OLD_TOKEN, tokens=ff.noisy_chain(400 * ff.T, seed=0)
        )
        new = ff.write_token_file(
            new, 0, vocab_size=ff.V, dataset_token=ff.NEW_TOKEN, tokens=ff.noisy_chain(200 * ff.T, seed=1)
        )
    return old, new


def parent_config(old: Path, mesh: dict[str, int], **extra: Any) -> config_lib.Config:
    steps = {"stop.num_tokens_train": PARENT_STEPS * ff.B * ff.T, "log.every_tokens": 10 * ff.B * ff.T}
    overrides = {"data.path": str(old), **steps, **{f"mesh.{k}": v for k, v in mesh.items()}, **extra}
    return config_lib.from_dict(ff.PARENT_CONFIG, list(overrides.items()))


def child_config(world: ff.World, parent: Path, mesh: dict[str, int], **extra: Any) -> config_lib.Config:
    overrides = {
        "reg.method": "kl_pre",
        "reg.coeff": 1.0,
        "reg.synth": True,
        "reg.buffer": 2,
        **{f"mesh.{k}": v for k, v in mesh.items()},
        **extra,
    }
    return world.child_config(overrides, parent=parent)


def losses(run_dir: Path) -> list[dict[str, float]]:
    return [{k: row[k] for k in LOSSES if row.get(k) is not None} for row in runs.read_metrics(run_dir)]


def max_abs_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    """The largest difference of any metric at any evaluation (losses in nats)."""
    assert len(a) == len(b) and all(x.keys() == y.keys() for x, y in zip(a, b)), (a, b)
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)


def placement_report(cfg: config_lib.Config, out: Path) -> dict[str, Any]:
    """How a fresh mesh run's state is laid out, before and after one compiled step."""
    setup = assemble.build_setup(resolve(cfg))
    params, opt_state, _ = train._initial_state(setup, out)
    assemble.compile_all(setup, params, opt_state)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    report = {
        "devices": jax.device_count(),
        "leaves": {
            jax.tree_util.keystr(path): {
                "shape": list(leaf.shape),
                "spec": str(leaf.sharding.spec),
                "shard": list(leaf.addressable_shards[0].data.shape),
            }
            for path, leaf in leaves
        },
    }
    batch = setup.placement.rows(lambda a, b: setup.batcher.batch(0, a, b), (setup.batcher.batch_size, ff.T))
    replay = train._rows(setup, np.zeros((0, ff.T), np.int32))
    before = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    state = setup.compiled["step"](params, opt_state, setup.ctx, batch, replay)[:2]
    arrays = jax.tree.leaves(state)
    after = [x.sharding for x in arrays]
    report["step_keeps_shardings"] = len(after) == len(jax.tree.leaves(before)) and all(
        a.is_equivalent_to(b, x.ndim) for a, b, x in zip(jax.tree.leaves(before), after, arrays)
    )
    new_opt = state[1]
    report["batch_spec"] = str(batch.sharding.spec)
    report["opt_mu_spec"] = str(jax.tree.leaves(new_opt)[1].sharding.spec)
    return report


class Crash(RuntimeError):
    pass


def crash_and_resume(
    old: Path, root: Path, mesh: dict[str, int], resume_mesh: dict[str, int]
) -> dict[str, Any]:
    """A mesh run killed after its checkpoint at step 20, resumed (on `resume_mesh`) to the end."""
    cfg = parent_config(old, mesh, **{"log.checkpoint_every_tokens": 20 * ff.B * ff.T})
    out = root / "crashed"

    def crash(row: dict[str, Any]) -> None:
        if row["step"] == 30:
            raise Crash

    try:
        train.train_and_evaluate(cfg, out, on_eval=crash)
    except Crash:
        pass
    meta = checkpoint.read_meta(out / runs.CHECKPOINT)
    resumed_cfg = cfg.replace({f"mesh.{k}": v for k, v in resume_mesh.items()})
    result = train.train_and_evaluate(resumed_cfg, out, resume=True)
    return {"checkpoint_step": meta["tracker"]["step"], "status": result.status, "losses": losses(out)}


HF_FIXTURE = Path(__file__).parent / "hf_fixtures" / "llama3"  # GQA, tied embeddings, RoPE scaling


def hf_runs(root: Path, mesh: dict[str, int]) -> dict[str, Any]:
    """A Hugging Face parent finetuned with self-generated KL replay prompted by its chat template
    (a prompt of several tokens), on one device and on `mesh`."""
    from forgetting_lib.prep.binarize import binarize

    paths = {name: root / f"hf_{name}.bin" for name in ("old", "new")}
    for name, corpus in (("old", "json/*.py"), ("new", "csv.py")):
        binarize(f"files:{{python_stdlib}}/{corpus}", HF_FIXTURE, paths[name], dataset_id=0, max_tokens=20000)
    raw = {
        "model": {"load_path": f"hf:{HF_FIXTURE}", "dtype": "float32"},
        "data": {"path": str(paths["new"]), "old_path": str(paths["old"]), "T": 32, "batch_size": 8},
        "opt": {"lr": 3e-3, "warmup_tokens": 0},
        "reg": {"method": "kl_pre", "coeff": 1.0, "synth": True, "replay_batch_size": 4, "buffer": 2},
        "stop": {"num_tokens_train": 12 * 8 * 32},
        "log": {"every_tokens": 4 * 8 * 32, "progress": False},
    }
    raw["data"].update(valid_tokens=8 * 32, microbatch_rows=8)
    for name, m in (("1", {}), ("mesh", mesh)):
        overrides = [("reg.prompt", "chat"), *((f"mesh.{k}", v) for k, v in m.items())]
        train.train_and_evaluate(config_lib.from_dict(raw, overrides), root / f"hf_{name}")
    return {
        "diff": max_abs_diff(losses(root / "hf_mesh"), losses(root / "hf_1")),
        "replay_rows_equal": bool(
            np.array_equal(runs.read_replay_rows(root / "hf_mesh"), runs.read_replay_rows(root / "hf_1"))
        ),
    }


def mesh_mode(root: Path) -> dict[str, Any]:
    old, new = data(root)
    world = ff.World(root / "parent_1", old, new)
    mesh = {"data": 2, "fsdp": 4}
    report: dict[str, Any] = {}
    tensor = {"data": 2, "fsdp": 2, "tensor": 2}
    for name, m in (("1", {}), ("mesh", mesh), ("tensor", tensor)):
        train.train_and_evaluate(parent_config(old, m), root / f"parent_{name}")
        train.train_and_evaluate(child_config(world, root / "parent_1", m), root / f"child_{name}")
        if name != "tensor":
            train.train_and_evaluate(
                child_config(world, root / "parent_1", m, **{"lora.rank": 4, "reg.synth": False}),
                root / f"lora_{name}",
            )
    for run in ("parent", "child", "lora"):
        report[f"{run}_diff"] = max_abs_diff(losses(root / f"{run}_mesh"), losses(root / f"{run}_1"))
    for run in ("parent", "child"):
        report[f"{run}_tensor_diff"] = max_abs_diff(losses(root / f"{run}_tensor"), losses(root / f"{run}_1"))
    report["tensor_placement"] = placement_report(parent_config(old, tensor), root / "tensor_placement")
    report["replay_rows_equal"] = bool(
        np.array_equal(runs.read_replay_rows(root / "child_mesh"), runs.read_replay_rows(root / "child_1"))
    )
    report["placement"] = placement_report(parent_config(old, {"fsdp": 8}), root / "placement")
    one, eight = parent_config(old, {}), parent_config(old, {"fsdp": 8})
    fits = [aot.step_report(c, placement=Placement(make_mesh(c.mesh))) for c in (one, eight)]
    report["fit"] = {k: [f[k] for f in fits] for k in ("step_bytes", "flops_per_step")}
    report["hf"] = hf_runs(root, tensor)
    resumed = crash_and_resume(old, root, {"fsdp": 8}, mesh)
    report["resume"] = {
        **resumed,
        "diff": max_abs_diff(resumed["losses"], losses(root / "parent_mesh")),
        "losses": None,
    }
    return report


def hosts_mode(root: Path) -> dict[str, Any]:
    old, new = data(root)
    world = ff.World(root / "parent", old, new)
    mesh = {"data": 2, "fsdp": 2}
    results = [
        train.train_and_evaluate(parent_config(old, mesh), root / "parent"),
        train.train_and_evaluate(child_config(world, root / "parent", mesh), root / "child"),
        train.train_and_evaluate(child_config(world, root / "parent", mesh, **REAL), root / "real"),
        train.train_and_evaluate(child_config(world, root / "parent", mesh, **EWC), root / "ewc"),
        # stops on process 0's clock: every process must stop after the same step
        train.train_and_evaluate(parent_config(old, mesh, **TIMED), root / "timed"),
    ]
    return {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "statuses": [r.status for r in results],
        "stop_reasons": [r.stop_reason for r in results],
        "steps": [r.step for r in results],
        **{run: losses(root / run) for run in ("parent", "child", "real", "ewc")},
    }


REAL = {"reg.synth": False}  # KL on the parent's real rows
EWC = {"reg.method": "ewc", "reg.coeff": 100.0, "reg.synth": False, "reg.fisher_batches": 2}
TIMED = {"stop.train_time_s": 3.0, "stop.num_tokens_train": 10**9, "log.every_tokens": 4 * ff.B * ff.T}


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    if mode == "hosts":  # before any JAX computation
        assert sharding.initialize_from_env()
    result = mesh_mode(root) if mode == "mesh" else hosts_mode(root)
    if sharding.is_main_process():
        (root / f"{mode}.json").write_text(json.dumps(result, indent=1))
