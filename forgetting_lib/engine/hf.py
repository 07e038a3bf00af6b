"""Hugging Face causal LMs in and out of the engine.

Import (`model.load_path=hf:<folder or hub id>`): a folder with `config.json`, `*.safetensors`
(one file, or shards listed by `model.safetensors.index.json`) and a tokenizer becomes our
`Transformer` (engine/model.py) with the same function: `read_architecture` maps config.json to
`ModelConfig` keys, `load_params` maps the weights to our parameter tree. A hub id is downloaded
by `huggingface_hub` into its cache first (network needed); a local folder needs none.

Families read (config.json `model_type`):
    llama    Llama 2/3.x (grouped-query attention, RoPE scaling "llama3", tied or untied), SmolLM2
    mistral  Mistral-style (a sliding window becomes model.window)
    qwen2    Qwen2/2.5: biases on q, k, v
    qwen3    Qwen3: RMSNorm of queries and keys per head
    apertus  QK-norm and a non-gated MLP (tanh-GELU only): the format our own models export to

Export is `hf_export.py`; this module's `provenance` reads what it records.

Weights: torch Linear weights are [out, in]; ours are [in, ...] (see model.py's glossary):
q_proj [N H, D] -> q [D, N, H]; k_proj, v_proj [K H, D] -> kv [D, 2, K, H] (or qkv [D, 3, N, H]
when K = N); o_proj [D, N H] -> out [N, H, D]; gate/up_proj [F, D] -> [D, F]; down_proj [D, F]
-> [F, D]; lm_head [V, D] -> unembed [D, V]; embed_tokens [V, D] = embed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ARCHITECTURE, HF_PREFIX, ConfigError, ModelConfig
from . import model as model_lib

PREFIX = HF_PREFIX  # model.load_path=hf:<folder or hub id>
PROVENANCE = "forgetting.json"  # what an exported folder records about its run
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "apertus")
_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # tanh-approximated GELU (jax.nn.gelu's)
Weights = dict[str, np.ndarray]  # our flat names ("embed", "blocks.0.qkv", ...) -> arrays


class HFModelError(ConfigError):
    """A Hugging Face folder cannot be imported or a run cannot be exported; the message says why."""


def is_hf(load_path: str) -> bool:
    return load_path.startswith(PREFIX)


def resolve_folder(load_path: str) -> Path:
    """The local folder of `hf:<folder or hub id>`; a hub id is downloaded into the HF cache."""
    name = load_path.removeprefix(PREFIX)
    folder = Path(os.path.expanduser(name))
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise HFModelError(
                f"model.load_path={load_path}: {folder} has no config.json (not a model folder)"
            )
        return folder
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise HFModelError(
            f"model.load_path={load_path}: no folder {folder} (relative to {os.getcwd()}), and "
            f"{name!r} is not a hub id of the form owner/name"
        )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]
        return Path(snapshot_download(repo_id=name, allow_patterns=patterns))
    except ImportError:
        raise HFModelError(
            f"model.load_path={load_path} needs huggingface_hub: pip install -e .[hf]"
        ) from None
    except Exception as err:  # offline, gated, missing: the hub client's own message says which
        raise HFModelError(
            f"model.load_path={load_path}: no local folder {folder}, and downloading hub id {name!r} "
            f"failed ({type(err).__name__}: {err}); download it where the hub is reachable and "
            f"point model.load_path at hf:<that folder>"
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise HFModelError(f"cannot read {path}: {err}") from None


def provenance(folder: Path) -> dict[str, Any] | None:
    """The `forgetting.json` of a folder this workbench exported, else None."""
    path = folder / PROVENANCE
    return read_json(path) if path.is_file() else None


def read_architecture(folder: Path) -> dict[str, Any]:
    """`ModelConfig` keys (ARCHITECTURE) of a Hugging Face folder's config.json."""
    made_here = provenance(folder)
    if made_here is not None:  # our own export: the architecture exactly as trained (gains or not)
        return {k: made_here["model"][k] for k in ARCHITECTURE}
    path = folder / "config.json"
    c = read_json(path)
    kind = c.get("model_type", "?")
    if kind not in FAMILIES:
        raise HFModelError(f"{path}: model_type {kind!r} is not supported; supported: {', '.join(FAMILIES)}")

    def need(key: str) -> Any:
        if c.get(key) is None:
            raise HFModelError(f"{path} has no {key!r}")
        return c[key]

    D, N = need("hidden_size"), need("num_attention_heads")
    if c.get("mlp_bias") or (kind != "qwen2" and c.get("attention_bias")):
        raise HFModelError(f"{path}: biases on the MLP or the attention output are not supported")
    act = c.get("hidden_act", "silu")
    if kind == "apertus":
        if act not in _GELU:
            raise HFModelError(f"{path}: hidden_act {act!r}: only tanh-GELU Apertus models are supported")
        mlp = "gelu"
    elif act != "silu":
        raise HFModelError(f"{path}: hidden_act {act!r}: the gated MLP must use silu (SwiGLU)")
    else:
        mlp = "swiglu"
    window = c.get("sliding_window") if c.get("use_sliding_window", kind == "mistral") else None
    if window and kind != "mistral":  # Qwen windows only the layers from max_window_layers on
        raise HFModelError(f"{path}: per-layer sliding windows (use_sliding_window) are not supported")
    return {
        "D": D,
        "L": need("num_hidden_layers"),
        "H": c.get("head_dim") or D // N,
        "V": need("vocab_size"),
        "heads": N,
        "kv_heads": c.get("num_key_value_heads") or N,
        "F": need("intermediate_size"),
        "mlp": mlp,
        "norm_gain": True,
        "qk_norm": kind in ("qwen3", "apertus"),
        "qkv_bias": kind == "qwen2",
        "tie_embed": bool(c.get("tie_word_embeddings", False)),
        "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
        **_rope(c, path),
        "window": int(window or 0),
    }


def _rope(c: dict[str, Any], path: Path) -> dict[str, Any]:
    """RoPE keys from `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = params.get("rope_theta", c.get("rope_theta", 10_000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {"rope_theta": float(theta), "rope_factor": 1.0}
    if kind != "llama3":
        raise HFModelError(f"{path}: RoPE scaling {kind!r} is not supported (only 'llama3')")
    return {
        "rope_theta": float(theta),
        "rope_factor": float(params["factor"]),
        "rope_low_freq": float(params["low_freq_factor"]),
        "rope_high_freq": float(params["high_freq_factor"]),
        "rope_original_len": int(params["original_max_position_embeddings"]),
    }


def _reader(folder: Path) -> Callable[[str], np.ndarray]:
    """get(name) -> array of a folder's safetensors weights (one file or an indexed set of shards)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = {name: folder / file for name, file in read_json(index)["weight_map"].items()}
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise HFModelError(f"{folder} has no *.safetensors weights (PyTorch .bin files are not read)")
        where = {}
        for file in files:
            with safe_open(file, "numpy") as f:
                where.update({name: file for name in f.keys()})

    def get(name: str) -> np.ndarray:
        for candidate in (name, name.removeprefix("model.")):  # some exports drop the "model." prefix
            if candidate in where:
                with safe_open(where[candidate], "numpy") as f:
                    return f.get_tensor(candidate)
        raise HFModelError(f"{folder}: the weights have no tensor {name!r}")

    return get


def layer_norm_names(kind: str) -> dict[str, str]:
    """Our per-block names -> the family's, under model.layers.{i}."""
    norms = (
        ("attention_layernorm", "feedforward_layernorm")
        if kind == "apertus"
        else (
            "input_layernorm",
            "post_attention_layernorm",
        )
    )
    return {"attn_norm": norms[0], "mlp_norm": norms[1]}


def hf_to_ours(cfg: ModelConfig, kind: str, get: Callable[[str], np.ndarray]) -> Weights:
    """Our flat weights from a family's tensors (`get(name)`); shapes as in model.py's glossary."""
    D, H, F = cfg.D, cfg.H, model_lib.mlp_width(cfg)
    N, K = model_lib.heads(cfg)
    out: Weights = {"embed": get("model.embed_tokens.weight")}
    if not cfg.tie_embed:
        out["unembed"] = get("lm_head.weight").T
    if cfg.norm_gain:
        out["final_norm"] = get("model.norm.weight")
    norms = layer_norm_names(kind)
    for i in range(cfg.L):
        at, ours = f"model.layers.{i}.", f"blocks.{i}."
        q = get(at + "self_attn.q_proj.weight").T.reshape(D, N, H)
        k = get(at + "self_attn.k_proj.weight").T.reshape(D, K, H)
        v = get(at + "self_attn.v_proj.weight").T.reshape(D, K, H)
        if K == N:
            out[ours + "qkv"] = np.stack([q, k, v], axis=1)  # [D, 3, N, H]
        else:
            out[ours + "q"], out[ours + "kv"] = q, np.stack([k, v], axis=1)  # [D, N, H], [D, 2, K, H]
        if cfg.qkv_bias:
            qb = get(at + "self_attn.q_proj.bias").reshape(N, H)
            kb = get(at + "self_attn.k_proj.bias").reshape(K, H)
            vb = get(at + "self_attn.v_proj.bias").reshape(K, H)
            if K == N:
                out[ours + "qkv_bias"] = np.stack([qb, kb, vb])
            else:
                out[ours + "q_bias"], out[ours + "kv_bias"] = qb, np.stack([kb, vb])
        out[ours + "out"] = get(at + "self_attn.o_proj.weight").T.reshape(N, H, D)
        if cfg.mlp == "swiglu":
            out[ours + "gate"] = get(at + "mlp.gate_proj.weight").T
        out[ours + "up"] = get(at + "mlp.up_proj.weight").T  # [D, F]
        out[ours + "down"] = get(at + "mlp.down_proj.weight").T  # [F, D]
        if cfg.norm_gain:
            for name, theirs in norms.items():
                out[ours + name] = get(at + theirs + ".weight")
            if cfg.qk_norm:
                out[ours + "q_norm"] = get(at + "self_attn.q_norm.weight")
                out[ours + "k_norm"] = get(at + "self_attn.k_norm.weight")
        assert out[ours + "up"].shape == (D, F), (out[ours + "up"].shape, D, F)
    return out


def unflatten(cfg: ModelConfig, weights: Weights) -> Any:
    """The parameter tree of `cfg` filled from flat weights, in model.param_dtype (shapes checked)."""
    _, abstract = model_lib.abstract_params(cfg)
    dtype = jnp.dtype(cfg.param_dtype)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        name = ".".join(str(k) for k in keys if k != "value")
        if name not in weights:
            raise HFModelError(f"no weight for {name} {tuple(leaf.shape)}")
        array = weights[name]
        if tuple(array.shape) != tuple(leaf.shape):
            raise HFModelError(
                f"weight {name} has shape {tuple(array.shape)}, the model needs {tuple(leaf.shape)}"
            )
        return jnp.asarray(array, dtype=dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def load_params(folder: Path, cfg: ModelConfig) -> Any:
    """Parameters of a Hugging Face folder for the (resolved) architecture `cfg`."""
    kind = read_json(folder / "config.json").get("model_type", "?")
    return unflatten(cfg, hf_to_ours(cfg, kind, _reader(folder)))
