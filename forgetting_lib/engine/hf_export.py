"""Our models out to Hugging Face (`finetune.export_run`, the CLI's `export`): a run's final
model as a folder `transformers` loads with the same logits (checked by
tests/hf_fixtures/make_golden.py check-export) and `hf.py` reads back.

The paper's architecture (RMSNorm without gain, QK-norm, non-gated GELU MLP) has no Llama
equivalent; it is written as `apertus` (Llama's layout plus per-head QK-norm and a non-gated
MLP) with unit norm gains. SwiGLU models are written as `llama` (`qwen2` with q/k/v biases,
`qwen3` with QK-norm, `mistral` with a sliding window). `forgetting.json` beside the weights
records where the model came from (its run, tokenizer fingerprint, dataset-id token and old-data
split), so a model that left the workbench finetunes on its return exactly as its run would
have: same `prev` rows, same prompt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ARCHITECTURE, ModelConfig
from . import model as model_lib
from .hf import PROVENANCE, HFModelError, Weights, layer_norm_names


def ours_to_hf(cfg: ModelConfig, kind: str, weights: Weights) -> Weights:
    """The inverse of `hf_to_ours`; norms our architecture does not have are written as ones."""
    D = cfg.D
    N, K = model_lib.heads(cfg)
    H = cfg.H
    ones = np.ones((D,), np.float32)
    out: Weights = {"model.embed_tokens.weight": weights["embed"]}
    if not cfg.tie_embed:
        out["lm_head.weight"] = weights["unembed"].T
    out["model.norm.weight"] = weights.get("final_norm", ones)
    norms = layer_norm_names(kind)
    for i in range(cfg.L):
        at, ours = f"model.layers.{i}.", f"blocks.{i}."
        if K == N:
            q, k, v = (weights[ours + "qkv"][:, j] for j in range(3))
        else:
            q, k, v = weights[ours + "q"], weights[ours + "kv"][:, 0], weights[ours + "kv"][:, 1]
        out[at + "self_attn.q_proj.weight"] = q.reshape(D, N * H).T
        out[at + "self_attn.k_proj.weight"] = k.reshape(D, K * H).T
        out[at + "self_attn.v_proj.weight"] = v.reshape(D, K * H).T
        if cfg.qkv_bias:
            if K == N:
                qb, kb, vb = weights[ours + "qkv_bias"]
            else:
                qb, (kb, vb) = weights[ours + "q_bias"], weights[ours + "kv_bias"]
            for name, b in (("q", qb), ("k", kb), ("v", vb)):
                out[at + f"self_attn.{name}_proj.bias"] = b.reshape(-1)
        out[at + "self_attn.o_proj.weight"] = weights[ours + "out"].reshape(N * H, D).T
        if cfg.mlp == "swiglu":
            out[at + "mlp.gate_proj.weight"] = weights[ours + "gate"].T
        out[at + "mlp.up_proj.weight"] = weights[ours + "up"].T
        out[at + "mlp.down_proj.weight"] = weights[ours + "down"].T
        for name, theirs in norms.items():
            out[at + theirs + ".weight"] = weights.get(ours + name, ones)
        if cfg.qk_norm:
            for name in ("q_norm", "k_norm"):
                out[at + f"self_attn.{name}.weight"] = weights.get(ours + name, np.ones((H,), np.float32))
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def flatten(params: Any) -> Weights:
    """Our parameter tree as {"embed": ..., "blocks.0.qkv": ...} of host arrays."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        flat[".".join(str(k) for k in keys if k != "value")] = np.asarray(leaf)
    return flat


def export_kind(cfg: ModelConfig) -> str:
    """The `model_type` a run of this architecture is written as."""
    if cfg.mlp == "gelu":
        if cfg.qkv_bias or cfg.window:
            raise HFModelError(
                "a GELU model with q/k/v biases or a sliding window has no Hugging Face equivalent "
                "here (Apertus has neither)"
            )
        if not cfg.qk_norm:
            raise HFModelError(
                "a GELU model without QK-norm has no Hugging Face equivalent here "
                "(Apertus needs QK-norm; Llama needs SwiGLU)"
            )
        return "apertus"
    if cfg.window and (cfg.qk_norm or cfg.qkv_bias):
        raise HFModelError("sliding-window attention is exported only for Mistral-style models")
    if cfg.qk_norm:
        if cfg.qkv_bias:
            raise HFModelError("QK-norm with q/k/v biases has no Hugging Face equivalent here")
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.window else "llama"


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, max_len: int, dtype: str) -> dict:
    """config.json of an exported model (keys read by transformers 4.5x and 5.x)."""
    kind = export_kind(cfg)
    N, K = model_lib.heads(cfg)
    classes = {
        "llama": "Llama",
        "mistral": "Mistral",
        "qwen2": "Qwen2",
        "qwen3": "Qwen3",
        "apertus": "Apertus",
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor != 1.0:
        rope.update(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq,
            high_freq_factor=cfg.rope_high_freq,
            original_max_position_embeddings=cfg.rope_original_len,
        )
    out = {
        "architectures": [f"{classes[kind]}ForCausalLM"],
        "model_type": kind,
        "vocab_size": cfg.V,
        "hidden_size": cfg.D,
        "intermediate_size": model_lib.mlp_width(cfg),
        "num_hidden_layers": cfg.L,
        "num_attention_heads": N,
        "num_key_value_heads": K,
        "head_dim": cfg.H,
        "hidden_act": "silu" if cfg.mlp == "swiglu" else "gelu_pytorch_tanh",
        "rms_norm_eps": cfg.norm_eps,
        # the rows it was trained on (at least the RoPE scaling's own context length)
        "max_position_embeddings": max(
            max_len, cfg.window, cfg.rope_original_len if cfg.rope_factor != 1 else 0
        ),
        "tie_word_embeddings": cfg.tie_embed,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None
        if cfg.rope_factor == 1.0
        else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }
    if kind == "llama":
        out["mlp_bias"] = False
    if kind in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    if kind == "mistral":
        out["sliding_window"] = cfg.window
    return out


def write_folder(
    out_dir: str | Path,
    cfg: ModelConfig,
    params: Any,
    *,
    bos_id: int | None,
    eos_id: int | None,
    max_len: int,
    dtype: str = "float32",
    extra: Callable[[Path], None] | None = None,
    made_here: dict[str, Any] | None = None,
) -> Path:
    """Write `params` (our tree) as a Hugging Face folder, atomically (a temporary folder renamed
    into place): config.json, generation_config.json, model.safetensors; `extra(tmp)` adds files
    (the tokenizer); `made_here` becomes forgetting.json."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16}[dtype]
    weights = ours_to_hf(cfg, export_kind(cfg), flatten(params))
    weights = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in weights.items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = hf_config(cfg, bos_id=bos_id, eos_id=eos_id, max_len=max_len, dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": 1.0}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if extra is not None:
            extra(tmp)
        if made_here is not None:
            (tmp / PROVENANCE).write_text(json.dumps(made_here, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            if not (out_dir / "config.json").is_file():
                raise HFModelError(f"{out_dir} exists and is not a model folder; choose another --out")
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def model_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if f.name in ARCHITECTURE}
