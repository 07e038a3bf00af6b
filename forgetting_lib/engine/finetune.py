"""Loading a parent run for finetuning: its architecture, its data split, its parameters.

A finetuning run names its parent with `model.load_path`. `resolve` copies the parent's
architecture and data split into the run's config (the `parent` section), so the resolved
`config.yaml` alone says which rows "old-data loss" is measured on: the parent's own validation
rows, chosen by the parent's split seed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from .. import config as config_lib, runs
from ..prep.binarize import TokenFileError, read_token_file
from ..prep.tokenizer import load_tokenizer, write_hf_tokenizer
from . import checkpoint, data as data_lib, hf, hf_export, model as model_lib
from .sampling import make_sampler, sample_from_id
from .sharding import Placement

KEY_MODEL = 0  # the model-init stream of a run's root key (shared with train.py)


class FinetuneError(config_lib.ConfigError):
    """The parent run cannot be used; the message names it and the fix."""


def resolve(cfg: config_lib.Config) -> config_lib.Config:
    """`cfg` with the architecture (config.ARCHITECTURE) and the `parent` section read from
    `model.load_path`: a finished run folder, or `hf:<folder or hub id>` (engine/hf.py)."""
    if not cfg.model.load_path:
        return cfg
    if hf.is_hf(cfg.model.load_path):
        return _resolve_hf(cfg)
    parent_dir = Path(cfg.model.load_path)
    summary = runs.read_summary(parent_dir)
    if summary is None or summary.get("status") != "finished":
        state = "has no summary.json" if summary is None else f"ended with status {summary.get('status')}"
        raise FinetuneError(
            f"model.load_path={parent_dir} is not a finished run ({state}); "
            f"finish (or --resume) that run first, or point at another run folder"
        )
    parent = config_lib.from_dict(runs.read_config(parent_dir))
    _check_architecture(cfg, parent.model, str(parent_dir))
    if cfg.data.T != parent.data.T:
        raise FinetuneError(
            f"data.T={cfg.data.T} but the parent {parent_dir} was trained with "
            f"T={parent.data.T}; set data.T={parent.data.T} (old-data rows are cut "
            f"with the parent's T)"
        )
    return cfg.replace({**parent_fields(parent, summary), **_old_path(cfg, parent.data.path)})


def parent_fields(parent: config_lib.Config, summary: dict[str, Any]) -> dict[str, Any]:
    """The architecture and `parent.*` keys a finetune of the finished run `parent` takes."""
    return {
        **from_parent_config(parent),
        "parent.seed": parent.parent.seed if parent.model.load_path else parent.run.seed,
        "parent.final_valid_ntp": summary["final"]["valid_ntp"],
        "parent.dataset_token": summary.get("dataset_token", -1),
        "parent.tokenizer_fingerprint": summary.get("tokenizer_fingerprint")
        or _data_fingerprint(parent.data.path),
    }


def _old_path(cfg: config_lib.Config, parent_data: str = "") -> dict[str, Any]:
    """`data.old_path` in place of the parent's own data; the parent's final loss is then on other
    rows, so forgetting is read from this run's step-0 evaluation (`final_valid_ntp` None)."""
    if not cfg.data.old_path or (parent_data and runs.same_path(cfg.data.old_path, parent_data)):
        return {}
    return {"parent.data_path": cfg.data.old_path, "parent.final_valid_ntp": None}


def _check_architecture(cfg: config_lib.Config, parent: config_lib.ModelConfig, where: str) -> None:
    given = config_lib.given_keys(cfg)
    clash = [
        k
        for k in config_lib.ARCHITECTURE
        if f"model.{k}" in given and getattr(cfg.model, k) != getattr(parent, k)
    ]
    if clash:
        values = ", ".join(f"model.{k}={getattr(cfg.model, k)} (parent: {getattr(parent, k)})" for k in clash)
        raise FinetuneError(
            f"{values}: a finetune keeps the architecture of its parent {where}; remove "
            f"{', '.join(f'model.{k}' for k in clash)} from the finetune's config and overrides "
            f"(it is read from the parent), or pretrain a parent of that size"
        )


def _resolve_hf(cfg: config_lib.Config) -> config_lib.Config:
    """A Hugging Face parent. One this workbench exported carries its run's `parent` keys in
    forgetting.json (its old data, split and prompt: it finetunes as its run would). Any other has
    no old data of its own (`data.old_path` names some, with this run's T, split seed and
    validation size), prompts with BOS, and scales weight drift by ||pi|| (its init is unknown)."""
    folder = hf.resolve_folder(cfg.model.load_path)
    arch = hf.read_architecture(folder)
    _check_architecture(cfg, config_lib.ModelConfig(**arch), cfg.model.load_path)
    made_here = hf.provenance(folder)
    if made_here is not None:
        fields = {f"parent.{k}": v for k, v in made_here["parent"].items()}
        data = made_here["parent"]["data_path"]
        fields["parent.data_path"] = os.path.normpath(os.path.join(folder, data)) if data else ""
        if cfg.data.T != fields["parent.T"]:
            raise FinetuneError(
                f"data.T={cfg.data.T} but {folder} was trained with T={fields['parent.T']}; set "
                f"data.T={fields['parent.T']} (old-data rows are cut with the parent's T)"
            )
    else:
        tok = load_tokenizer(folder)
        if tok.bos_id is None:
            raise FinetuneError(f"{folder}: its tokenizer names no BOS token, the self-generated prompt")
        d = cfg.data
        fields = {
            "parent.data_path": "",
            "parent.split_seed": d.split_seed,
            "parent.T": d.T,
            "parent.valid_tokens": d.valid_tokens,
            "parent.seed": -1,  # no init to measure drift from: ||theta - pi|| / ||pi||
            "parent.final_valid_ntp": None,
            "parent.dataset_token": tok.bos_id,
            "parent.tokenizer_fingerprint": tok.fingerprint,
        }
    old = _old_path(cfg, fields["parent.data_path"])
    return cfg.replace({**{f"model.{k}": v for k, v in arch.items()}, **fields, **old})


def from_parent_config(parent: config_lib.Config) -> dict[str, Any]:
    """The overrides a finetune takes from its parent's config alone: the architecture
    (config.ARCHITECTURE) and the parent's data split (its valid rows are the `prev` set)."""
    return {
        **{f"model.{k}": getattr(parent.model, k) for k in config_lib.ARCHITECTURE},
        "parent.data_path": parent.data.path,
        "parent.split_seed": parent.data.split_seed,
        "parent.T": parent.data.T,
        "parent.valid_tokens": parent.data.valid_tokens,
    }


def _data_fingerprint(path: str) -> str:
    """The tokenizer fingerprint in a token file's sidecar ('' if the file is gone: unknown)."""
    try:
        return read_token_file(path)[1].get("tokenizer_fingerprint", "")
    except (TokenFileError, OSError, KeyError):
        return ""


@dataclass(frozen=True)
class Parent:
    """The frozen parent: parameters pi and the norm ||pi - init|| that scales weight drift."""

    path: Path
    params: Any
    init_distance: float


def load_parent(cfg: config_lib.Config, placement: Placement | None = None) -> Parent:
    """Parameters of the (resolved) config's parent, from its checkpoint, placed by `placement`
    (one device by default, or sharded over a mesh)."""
    if hf.is_hf(cfg.model.load_path):
        path = hf.resolve_folder(cfg.model.load_path)
        params = hf.load_params(path, cfg.model)
    else:
        path = Path(cfg.model.load_path)
        stored_dtype = runs.read_config(path)["model"].get("param_dtype", "float32")  # may differ
        _, abstract = model_lib.abstract_params(dataclasses.replace(cfg.model, param_dtype=stored_dtype))
        stored, _ = checkpoint.load(path / runs.CHECKPOINT, {"params": abstract})
        params = model_lib.to_param_dtype(cfg.model, jax.device_put(stored["params"]))
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(np.float32), tree)  # noqa: E731
    if cfg.parent.seed >= 0:
        key = jax.random.fold_in(jax.random.key(cfg.parent.seed), KEY_MODEL)
        init = model_lib.init_model(cfg.model, key=key)[1]
        distance = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, f32(params), f32(init))))
    else:  # an imported model's init is unknown: drift is measured relative to ||pi||
        distance = float(optax.tree.norm(f32(params)))
    if placement is not None and placement.mesh is not None:
        params = placement.put(jax.device_get(params))
    return Parent(path=path, params=params, init_distance=distance)


def load_run(run_dir: str | Path) -> tuple[config_lib.Config, Any, Any]:
    """(resolved config, model graphdef, parameters) of a run folder's latest checkpoint; a LoRA
    run's checkpoint holds merged weights, so this is the model the run ended with."""
    run_dir = Path(run_dir)
    cfg = config_lib.from_dict(runs.read_config(run_dir))
    graphdef, abstract = model_lib.abstract_params(cfg.model)
    stored, _ = checkpoint.load(run_dir / runs.CHECKPOINT, {"params": abstract})
    return cfg, graphdef, jax.device_put(stored["params"])


def export_run(
    run_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32", reference_rows: int = 0
) -> Path:
    """A finished run's final model as a Hugging Face folder (engine/hf.py: the format, the weight
    layout) with its tokenizer, and a forgetting.json holding what a finetune of it takes from the
    run (its old data, split, dataset-id token, final validation loss), so that `hf:<out_dir>`
    finetunes exactly as `<run_dir>` would. Written atomically; an existing export is replaced.
    `reference_rows` > 0 also writes that many of the run's validation rows and our float32 logits
    (reference_tokens.npy [n, T], reference_logits.npy [n, T, V]) for checking it in transformers."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    summary = runs.read_summary(run_dir)
    if summary is None or summary.get("status") != "finished":
        raise FinetuneError(f"{run_dir} is not a finished run; only finished runs are exported")
    cfg, _, params = load_run(run_dir)
    fields = parent_fields(cfg, summary)
    parent = {k.removeprefix("parent."): v for k, v in fields.items() if k.startswith("parent.")}
    parent["data_path"] = os.path.relpath(os.path.abspath(parent["data_path"]), os.path.abspath(out_dir))
    sidecar = read_token_file(cfg.data.path)[1]
    tok = load_tokenizer(sidecar["tokenizer_dir"])
    made_here = {
        "format": "forgetting-hf-export-v1",
        "run": os.path.abspath(run_dir),
        "model": hf_export.model_fields(cfg.model),
        "parent": parent,
    }
    return hf_export.write_folder(
        out_dir,
        cfg.model,
        params,
        bos_id=getattr(tok, "bos_id", None),
        eos_id=tok.eos_id,
        max_len=cfg.data.T,
        dtype=dtype,
        extra=lambda folder: _export_extras(folder, tok, cfg, params, reference_rows),
        made_here=made_here,
    )


def _export_extras(folder: Path, tok: Any, cfg: config_lib.Config, params: Any, reference_rows: int) -> None:
    write_hf_tokenizer(tok, folder)
    if reference_rows > 0:
        d = cfg.data
        rows = data_lib.open_rows(
            d.path, T=d.T, valid_tokens=d.valid_tokens, split_seed=d.split_seed, vocab_size=cfg.model.V
        )
        tokens = rows.rows(rows.valid_rows[:reference_rows]).astype(np.int32)  # [n, T]
        graphdef = model_lib.abstract_params(dataclasses.replace(cfg.model, dtype="float32"))[0]
        logits = model_lib.make_forward(graphdef)(params, jax.numpy.asarray(tokens))  # [n, T, V]
        np.save(folder / "reference_tokens.npy", tokens)
        np.save(folder / "reference_logits.npy", np.asarray(logits, np.float32))


def replay_examples(
    run_dir: str | Path, n: int, *, seed: int = 0, temperature: float = 1.0
) -> dict[str, np.ndarray]:
    """Both kinds of replay rows of a run, [n, T] each, to look at side by side:
    "self_generated" (sampled from its final model prompted with its data's dataset-id token
    alone, as self-generated replay does) and "real" (its first n validation rows)."""
    cfg, graphdef, params = load_run(run_dir)
    d = cfg.data
    rows = data_lib.open_rows(
        d.path, T=d.T, valid_tokens=d.valid_tokens, split_seed=d.split_seed, vocab_size=cfg.model.V
    )
    sampler = make_sampler(graphdef, length=d.T, temperature=temperature)
    sampled = sample_from_id(sampler, params, rows.dataset_token, n, jax.random.key(seed))
    return {"self_generated": np.asarray(sampled), "real": rows.rows(rows.valid_rows[:n])}
