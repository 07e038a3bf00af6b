"""Hugging Face models in the engine (engine/hf.py, the Llama-family variants of engine/model.py).

The golden data in tests/hf_fixtures/ was made once with PyTorch `transformers`
(tests/hf_fixtures/make_golden.py; torch is not a dependency): tiny random models of each family
in float32, their logits on fixed tokens and their greedy generations. Our import must give the
same logits (1e-4) and the same greedy tokens. Export is checked here by writing an imported
model back and comparing every tensor with the original file (what transformers reads), and
offline by `make_golden.py check-export` (transformers loads our folder: same logits).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from forgetting_lib.config import ConfigError, ModelConfig
from forgetting_lib.engine import hf, hf_export, lora, model as model_lib
from forgetting_lib.engine.sampling import make_sampler

FIXTURES = Path(__file__).parent / "hf_fixtures"
FAMILIES = ["llama3", "qwen2", "mistral", "apertus", "qwen3"]


@pytest.fixture(autouse=True)
def strict_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield


def imported(family: str, **changes) -> tuple[ModelConfig, object, object]:
    folder = FIXTURES / family
    cfg = ModelConfig(**hf.read_architecture(folder), dtype="float32", **changes)
    return cfg, model_lib.abstract_params(cfg)[0], hf.load_params(folder, cfg)


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "numpy") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_tokens_match_transformers(family):
    cfg, graphdef, params = imported(family)
    golden = np.load(FIXTURES / family / "golden.npz")
    logits = np.asarray(model_lib.make_forward(graphdef)(params, jnp.asarray(golden["tokens"])))
    assert logits.shape == golden["logits"].shape
    np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)
    greedy = make_sampler(graphdef, length=golden["greedy"].shape[1], temperature=0)
    tokens = greedy(params, jnp.asarray(golden["prompt"]), jax.random.key(0))  # KV-cache decoding
    np.testing.assert_array_equal(np.asarray(tokens), golden["greedy"])


def test_families_cover_the_architecture_variants():
    arch = {family: hf.read_architecture(FIXTURES / family) for family in FAMILIES}
    assert arch["llama3"]["kv_heads"] < arch["llama3"]["heads"] and arch["llama3"]["tie_embed"]
    assert arch["llama3"]["rope_factor"] == 32.0 and arch["llama3"]["rope_original_len"] == 16
    assert arch["qwen2"]["qkv_bias"] and not arch["qwen2"]["qk_norm"]
    assert arch["qwen3"]["qk_norm"] and arch["qwen3"]["mlp"] == "swiglu"
    assert arch["apertus"]["mlp"] == "gelu" and arch["apertus"]["qk_norm"]
    assert all(a["norm_gain"] for a in arch.values())
    # the sharded llama3 checkpoint is read through its index
    assert (FIXTURES / "llama3" / "model.safetensors.index.json").is_file()


def test_parameter_count_formula_matches_the_imported_tree():
    for family in FAMILIES:
        cfg, _, params = imported(family)
        assert model_lib.count_params(params) == model_lib.param_formula(cfg), family


def test_bfloat16_parameters():
    cfg, graphdef, params = imported("llama3", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    golden = np.load(FIXTURES / "llama3" / "golden.npz")
    logits = np.asarray(model_lib.make_forward(graphdef)(params, jnp.asarray(golden["tokens"])))
    assert np.abs(logits - golden["logits"]).max() < 0.15  # bf16 weights: ~3 significant digits
    assert np.mean(logits.argmax(-1) == golden["logits"].argmax(-1)) > 0.9


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_back_the_same_tensors(family, tmp_path):
    """Import then export is the identity on every tensor transformers reads (names, shapes,
    values), and config.json keeps the architecture."""
    cfg, _, params = imported(family)
    out = hf_export.write_folder(tmp_path / family, cfg, params, bos_id=1, eos_id=2, max_len=64)
    ours, theirs = _tensors(out), _tensors(FIXTURES / family)
    assert set(ours) == set(theirs)
    for name, array in theirs.items():
        np.testing.assert_array_equal(ours[name], array, err_msg=name)
    assert hf.read_architecture(out) == hf.read_architecture(FIXTURES / family)
    original = json.loads((FIXTURES / family / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    # Mistral without a sliding window is Llama
    assert written["model_type"] == {"mistral": "llama"}.get(family, original["model_type"])


ARCHITECTURES = {  # our own architectures and the format each exports to
    "apertus": {},  # the paper's: no norm gains, QK-norm, non-gated GELU
    "llama": dict(mlp="swiglu", qk_norm=False, norm_gain=True, kv_heads=2, tie_embed=True, rope_factor=8.0),
    "qwen2": dict(mlp="swiglu", qk_norm=False, norm_gain=True, qkv_bias=True),
    "qwen3": dict(mlp="swiglu", norm_gain=True, kv_heads=1),
}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_our_architectures_round_trip(kind, tmp_path):
    cfg = ModelConfig(D=32, L=2, H=8, V=50, dtype="float32", rope_original_len=8, **ARCHITECTURES[kind])
    graphdef, params = model_lib.init_model(cfg, key=jax.random.key(0))
    # make gains and biases matter (they start at 1 and 0)
    params = jax.tree.map(lambda x: x + 0.1 if x.ndim == 1 or x.shape[0] in (2, 3) else x, params)
    assert hf_export.export_kind(cfg) == kind
    out = hf_export.write_folder(tmp_path / kind, cfg, params, bos_id=None, eos_id=1, max_len=16)
    arch = hf.read_architecture(out)
    back_cfg = ModelConfig(**arch, dtype="float32")
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    expected = model_lib.make_forward(graphdef)(params, tokens)
    back = hf.load_params(out, back_cfg)
    got = model_lib.make_forward(model_lib.abstract_params(back_cfg)[0])(back, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)
    if kind == "apertus":  # gains written as ones, read back as gains: one more vector per norm
        assert arch["norm_gain"] and not cfg.norm_gain


def test_architectures_without_an_export_format_are_refused():
    for changes in ({"qk_norm": False}, {"qkv_bias": True}, {"window": 16}):
        with pytest.raises(hf.HFModelError, match="no Hugging Face equivalent"):
            hf_export.export_kind(ModelConfig(**changes))


def test_sliding_window_limits_attention():
    """window = 1: every position attends to itself alone, so its logits depend on its token only."""
    cfg = ModelConfig(D=32, L=2, H=8, V=50, dtype="float32", window=1)
    graphdef, params = model_lib.init_model(cfg, key=jax.random.key(0))
    forward = model_lib.make_forward(graphdef)
    a = jnp.array([[5, 6, 7, 8]])
    b = jnp.array([[9, 6, 7, 8]])
    la, lb = np.asarray(forward(params, a)), np.asarray(forward(params, b))
    np.testing.assert_allclose(la[:, 1:], lb[:, 1:], atol=1e-6)
    assert np.abs(la[:, 0] - lb[:, 0]).max() > 1e-3
    wide = dataclasses.replace(cfg, window=4)
    full = dataclasses.replace(cfg, window=0)
    np.testing.assert_array_equal(
        np.asarray(model_lib.make_forward(model_lib.abstract_params(wide)[0])(params, a)),
        np.asarray(model_lib.make_forward(model_lib.abstract_params(full)[0])(params, a)),
    )


def test_lora_adapts_every_matrix_of_a_gqa_swiglu_model():
    cfg, _, params = imported("llama3")
    adapters = lora.init_adapters(params, 4, key=jax.random.key(0))
    names = {name.split(".")[1] for name in adapters}
    assert names == {"q", "kv", "out", "gate", "up", "down"}
    merged = lora.merge(params, adapters)  # B = 0: unchanged at the start
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(hf.HFModelError, match="not a hub id"):
        hf.resolve_folder(f"hf:{tmp_path / 'missing' / 'deeper' / 'x'}")
    (tmp_path / "m").mkdir()
    with pytest.raises(hf.HFModelError, match="config.json"):
        hf.resolve_folder(f"hf:{tmp_path / 'm'}")
    config = json.loads((FIXTURES / "llama3" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(hf.HFModelError, match="gpt2"):
        hf.read_architecture(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(hf.HFModelError, match="silu"):
        hf.read_architecture(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.HFModelError, match="safetensors"):
        hf.load_params(tmp_path / "m", ModelConfig(**hf.read_architecture(tmp_path / "m")))
    assert issubclass(hf.HFModelError, ConfigError)


def test_legacy_rope_keys_are_read(tmp_path):
    """transformers 4 wrote rope_theta + rope_scaling (Llama 3.2 on the hub); 5 writes rope_parameters."""
    config = json.loads((FIXTURES / "llama3" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    legacy = {**config, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    assert hf.read_architecture(tmp_path) == hf.read_architecture(FIXTURES / "llama3")
