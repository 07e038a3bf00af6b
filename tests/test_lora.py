"""LoRA: B = 0 adapters change nothing, adapters sit on every block matrix in its [fan_in, fan_out]
layout, a LoRA run moves each block matrix by a rank-r delta and leaves the embeddings alone, and
its checkpoint (merged full parameters) is a valid parent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from forgetting_lib import config as config_lib, runs
from forgetting_lib.config import ModelConfig
from forgetting_lib.engine import checkpoint, lora
from forgetting_lib.engine.finetune import KEY_MODEL, load_parent, resolve
from forgetting_lib.engine.model import abstract_params, init_model, make_forward
from forgetting_lib.engine.train import train_and_evaluate

from finetune_fixtures import PARENT_SEED, T, V, world  # noqa: F401

CFG = ModelConfig(D=32, L=2, H=16, V=V, dtype="float32")
RANK = 4
# [fan_in, fan_out] of each block matrix for D=32, H=16 (N=2 heads, F=128)
FANS = {"qkv": (32, 96), "out": (32, 32), "up": (32, 128), "down": (128, 32)}


@pytest.fixture(scope="module")
def model():
    """Random tiny model drawn with numpy (jitting the init costs seconds)."""
    graphdef, shapes = abstract_params(CFG)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, CFG.D**-0.5, s.shape), s.dtype), shapes)
    return graphdef, params


def block_matrices(params) -> dict[str, np.ndarray]:
    """ "block.name" -> the matrix as float64 [fan_in, fan_out]."""
    out = {}
    for i in range(CFG.L):
        for name, (fan_in, fan_out) in FANS.items():
            leaf = params["blocks"][i][name][...]
            out[f"{i}.{name}"] = np.asarray(leaf, np.float64).reshape(fan_in, fan_out)
    return out


def numerical_rank(m: np.ndarray) -> int:
    s = np.linalg.svd(m, compute_uv=False)
    return int((s > 1e-4 * s[0]).sum()) if s[0] > 0 else 0


def test_zero_B_leaves_params_and_logits_unchanged(model):
    graphdef, params = model
    adapters = lora.init_adapters(params, RANK, key=jax.random.key(0))
    merged = lora.merge(params, adapters)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    forward = jax.jit(make_forward(graphdef))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, T)), jnp.int32)
    np.testing.assert_array_equal(forward(merged, tokens), forward(params, tokens))


def test_adapters_on_every_block_matrix(model):
    _, params = model
    adapters = lora.init_adapters(params, RANK, key=jax.random.key(0))
    assert set(adapters) == {f"{i}.{n}" for i in range(CFG.L) for n in FANS}  # no embeddings
    for name, ab in adapters.items():
        fan_in, fan_out = FANS[name.split(".")[1]]
        assert ab["A"].shape == (fan_in, RANK) and ab["B"].shape == (RANK, fan_out)
        assert not np.any(np.asarray(ab["B"]))
    scaled = np.concatenate([np.ravel(ab["A"]) * np.sqrt(ab["A"].shape[0]) for ab in adapters.values()])
    assert 0.9 < scaled.std() < 1.1  # A ~ N(0, 1/fan_in)
    assert lora.count(adapters) == sum(RANK * (i + o) for i, o in FANS.values()) * CFG.L
    assert not np.array_equal(adapters["0.up"]["A"], adapters["1.up"]["A"])


def test_merge_adds_A_times_B_in_fan_layout(model):
    _, params = model
    adapters = lora.init_adapters(params, RANK, key=jax.random.key(0))
    rng = np.random.default_rng(2)
    adapters = {
        k: {"A": v["A"], "B": jnp.asarray(rng.normal(0, 0.1, v["B"].shape), jnp.float32)}
        for k, v in adapters.items()
    }
    merged, base = block_matrices(lora.merge(params, adapters)), block_matrices(params)
    for name, ab in adapters.items():
        delta = merged[name] - base[name]
        np.testing.assert_allclose(delta, np.asarray(ab["A"] @ ab["B"]), atol=1e-6)
        assert numerical_rank(delta) == RANK
    np.testing.assert_array_equal(lora.merge(params, adapters)["embed"][...], params["embed"][...])


def test_rank_larger_than_a_matrix_is_rejected(model, world, tmp_path):
    _, params = model
    lora.init_adapters(params, 32, key=jax.random.key(0))  # = min(fan_in, fan_out) of `out`
    with pytest.raises(lora.LoraError, match="lora.rank=33"):
        lora.init_adapters(params, 33, key=jax.random.key(0))
    with pytest.raises(lora.LoraError, match="lora.rank"):
        train_and_evaluate(world.child_config({"lora.rank": 33}), tmp_path / "too_big")


@pytest.fixture(scope="module")
def lora_run(world):
    return world.finetune("lora", {"lora.rank": RANK})


def stored_params(run_dir, cfg):
    stored, _ = checkpoint.load(run_dir / runs.CHECKPOINT, {"params": abstract_params(cfg.model)[1]})
    return stored["params"]


def test_lora_run_moves_block_matrices_by_rank_r(world, lora_run):
    rows = runs.read_metrics(lora_run.out_dir)
    assert rows[0]["prev_kl"] == 0.0 and rows[0]["valid_kl"] == 0.0 and rows[0]["drift"] == 0.0
    assert rows[-1]["valid_ntp"] < rows[0]["valid_ntp"] - 1.0  # the adapters learned
    cfg = config_lib.load(lora_run.out_dir / runs.CONFIG)
    tuned, parent = stored_params(lora_run.out_dir, cfg), stored_params(world.parent, cfg)
    for name in ("embed", "unembed"):
        np.testing.assert_array_equal(tuned[name][...], parent[name][...])
    parent_blocks = block_matrices(parent)
    for name, matrix in block_matrices(tuned).items():
        assert numerical_rank(matrix - parent_blocks[name]) == RANK, name


@pytest.fixture(scope="module")
def lora_child(world, lora_run):
    """Plain finetuning (back on the old data) of the LoRA run's checkpoint."""
    return world.finetune("lora_child", {"data.path": str(world.old)}, parent=lora_run.out_dir, steps=4)


def test_lora_checkpoint_is_a_parent(world, lora_run, lora_child):
    cfg = config_lib.load(lora_child.out_dir / runs.CONFIG)
    assert cfg.parent.data_path == str(world.new)  # the LoRA run's data is now the old data
    row = runs.read_metrics(lora_child.out_dir)[0]
    assert row["prev_kl"] == 0.0 and row["drift"] == 0.0
    assert row["prev_ntp"] == pytest.approx(lora_run.final["valid_ntp"], abs=1e-6)


def test_chained_finetuning_drift_uses_the_root_init(lora_run, lora_child):
    cfg = config_lib.load(lora_child.out_dir / runs.CONFIG)
    pi = load_parent(resolve(cfg))
    _, root_init = init_model(cfg.model, key=jax.random.fold_in(jax.random.key(PARENT_SEED), KEY_MODEL))
    expected = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, pi.params, root_init)))
    assert pi.init_distance == pytest.approx(expected, rel=1e-5)
