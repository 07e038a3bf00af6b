"""The ahead-of-time fit check (engine/aot.py, experiments/fit.py): programs compiled from shapes
alone report FLOPs near the analytic count and memory that grows with the batch, the width and
the regulariser's work, without a device buffer or a data file; the CLI tabulates a sweep once
per stage and distinct shape."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import pandas as pd
import pytest
import yaml

from forgetting_lib import config as config_lib
from forgetting_lib.__main__ import main as cli_main
from forgetting_lib.engine import aot
from forgetting_lib.experiments import cost, fit

V, T, B = 64, 32, 8
MODEL = {"D": 32, "L": 1, "H": 16, "V": V}
PRETRAIN = {
    "model": MODEL,
    "data": {"path": "nowhere/old.bin", "T": T, "batch_size": B, "valid_tokens": 4 * T},
    "stop": {"num_tokens_train": 100 * B * T},
}
FINETUNE = {
    "model": {"load_path": "nowhere/parent"},
    "data": {"path": "nowhere/new.bin", "T": T, "batch_size": B, "valid_tokens": 4 * T},
    "reg": {"coeff": 1.0, "replay_batch_size": B},
    "stop": {"num_tokens_train": 100 * B * T},
    "log": {"eval_kl": False},
}
FLOPS_FACTOR = 1.25  # compiled / analytic: the loss chunks' recomputed logits add 2 D V per token


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict:
    """`fit` run once on a two-stage sweep (built as for a GPU): pretraining at a base shape,
    twice its batch and twice its width (each at two LRs), and the base model finetuned plainly
    and with KL replay (each at two coefficients). Returns the exit status, the printed text,
    the table and how many device arrays and host-to-device copies appeared meanwhile."""
    out = tmp_path_factory.mktemp("fit")
    spec = {
        "out": str(out / "sweep"),
        "stages": {
            "pretrain": {
                "base": PRETRAIN,
                "grid": {
                    "shape": {"base": {}, "batch": {"data.batch_size": 2 * B}, "width": {"model.D": 64}},
                    "opt.lr": [1e-3, 3e-3],
                },
            },
            "finetune": {  # the base pretraining point's architecture, read from its config
                "base": FINETUNE,
                "set": {"model.load_path": str(out / "sweep" / "pretrain" / "shape=base__lr=0.001")},
                "grid": {"method": ["standard", "kl_real"], "reg.coeff": [0.1, 1.0]},
            },
        },
    }
    path = out / "spec.yaml"
    path.write_text(yaml.safe_dump({"sweep": spec}, sort_keys=False))
    tables: list[pd.DataFrame] = []
    table_of = fit.fit_table

    def recording(*args, **kwargs):
        tables.append(table_of(*args, **kwargs))
        return tables[-1]

    before, printed = len(jax.live_arrays()), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(fit, "fit_table", recording)
        with jax.transfer_guard("disallow"):  # any host -> device copy raises
            status = cli_main(["fit", str(path), "--dtype", "bfloat16", "--device-memory-gb", "1"])
    table = tables[0].set_index("example")
    return {
        "status": status,
        "text": printed.getvalue(),
        "table": table,
        "live": len(jax.live_arrays()) - before,
    }


def test_no_device_buffer_is_allocated(checked):
    assert checked["live"] == 0


def test_cli_prints_each_stage_once_per_distinct_shape(checked):
    assert checked["status"] == 0
    text = checked["text"]
    lines = text[text.index("ahead-of-time") :].splitlines()[2:]
    rows = [line.split() for line in lines if line.split()[0] in ("pretrain", "finetune")]
    # columns: stage points example params dtype micro devices TFLOP analytic step-GiB peak-GiB peak-in fits
    assert [(r[0], r[1]) for r in rows] == [("pretrain", "2")] * 3 + [("finetune", "2")] * 2
    assert [r[2] for r in rows] == [
        *("shape=base__lr=0.001", "shape=batch__lr=0.001", "shape=width__lr=0.001"),
        *("method=standard__coeff=0.1", "method=kl_real__coeff=0.1"),
    ]
    assert all(r[4:7] == ["bfloat16", "1", "1"] and r[12] == "yes" for r in rows)  # a GPU's, one device
    assert "not found" not in text  # the finetune's parent point supplied its architecture
    assert "bfloat16 compiled on a CPU" in text  # why bf16 memory reads high here


def test_compiled_flops_are_near_the_analytic_count(checked):
    table = checked["table"]
    base, batch = table.loc["shape=base__lr=0.001"], table.loc["shape=batch__lr=0.001"]
    analytic = cost.step_flops(config_lib.from_dict(PRETRAIN))[0]  # B T (6 N + 12 L T D)
    assert base["flops_analytic"] == pytest.approx(analytic)
    assert 1.0 <= base["flops_per_step"] / analytic <= FLOPS_FACTOR
    assert batch["flops_per_step"] == pytest.approx(2 * base["flops_per_step"])
    kl = table.loc["method=kl_real__coeff=0.1"]  # + replay rows and the parent's forward on them
    assert 1.0 <= kl["flops_per_step"] / kl["flops_analytic"] <= FLOPS_FACTOR


def test_memory_grows_with_batch_width_and_kl_replay(checked):
    table = checked["table"]
    base = table.loc["shape=base__lr=0.001"]
    for bigger in ("shape=batch__lr=0.001", "shape=width__lr=0.001"):
        assert table.loc[bigger, "step_bytes"] > base["step_bytes"]
        assert table.loc[bigger, "peak_bytes"] > base["peak_bytes"]
    standard, kl = table.loc["method=standard__coeff=0.1"], table.loc["method=kl_real__coeff=0.1"]
    assert kl["step_bytes"] > standard["step_bytes"] and kl["peak_bytes"] > standard["peak_bytes"]
    assert (table["peak_bytes"] >= table["step_bytes"]).all()


def test_matmul_flops_count_loop_bodies_by_their_trip_count():
    def scanned(x, w):  # [8, 64, 128] @ [128, 128], one slice per loop iteration
        return jax.lax.scan(lambda c, xi: (c, jnp.tanh(xi @ w)), None, x)[1]

    args = (jax.ShapeDtypeStruct((8, 64, 128), jnp.float32), jax.ShapeDtypeStruct((128, 128), jnp.float32))
    compiled = jax.jit(scanned).lower(*args).compile()
    assert aot.hlo_matmul_flops(compiled.as_text()) == 2 * 8 * 64 * 128 * 128
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert xla["flops"] < 2 * 8 * 64 * 128 * 128 / 4  # XLA's own count sees one iteration


def test_points_differing_only_in_values_share_a_key():
    parent = config_lib.from_dict(PRETRAIN)

    def key(*overrides: str) -> tuple:
        cfg = cost.with_parent(config_lib.from_dict(FINETUNE, list(overrides)), parent)
        return aot.shape_key(cfg, platform="gpu")

    base = key("reg.method=kl_pre")
    assert key("reg.method=kl_pre", "opt.lr=1e-5", "reg.coeff=10", "run.seed=3") == base
    assert key("reg.method=kl_pre", "reg.coeff=0") != base  # coefficient 0 drops the term
    assert key("reg.method=ntp_pre") != base
    assert key("reg.method=kl_pre", "reg.replay_batch_size=4") != base
    assert key("reg.method=kl_pre", "model.dtype=float32") != base
    mixed = {"mix.path": "nowhere/mix.bin", "mix.valid_tokens": 0}
    a_quarter, a_half = (aot.shape_key(pretrain_with(mixed, f)) for f in (0.25, 0.5))
    assert a_quarter == a_half != aot.shape_key(pretrain_with(mixed, 0.0))  # the same batch shape


def pretrain_with(overrides: dict, fraction: float) -> config_lib.Config:
    return config_lib.from_dict(PRETRAIN, [*overrides.items(), ("mix.fraction", fraction)])


def test_load_points_reads_run_configs_and_notebook_parameter_files(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(PRETRAIN))
    assert [p.stage for p in fit.load_points(run)] == ["run"]
    (point,) = fit.load_points(run, ["data.microbatch_rows=4"])  # --set: applied to every point
    assert point.config().data.microbatch_rows == 4
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(yaml.safe_dump(FINETUNE))
    notebook = tmp_path / "04_finetune_replay.yaml"  # a notebook's parameters: run_config + methods
    notebook.write_text(yaml.safe_dump({"run_config": str(finetune), "methods": ["standard", "kl_self"]}))
    points = fit.load_points(notebook)
    assert [(p.config().reg.method, p.config().reg.synth) for p in points] == [
        ("none", False),
        ("kl_pre", True),
    ]
    (tmp_path / "other.yaml").write_text("corpora: {en: sample:en}\n")
    with pytest.raises(config_lib.ConfigError, match="not a sweep spec"):
        fit.load_points(tmp_path / "other.yaml")
