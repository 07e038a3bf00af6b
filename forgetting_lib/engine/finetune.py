"""Loading a parent run for finetuning: its architecture, its data split, its parameters.

A finetuning run names its parent with `model.load_path`. `resolve` copies the parent's
architecture and data split into the run's config (the `parent` section), so the resolved
`config.yaml` alone says which rows "old-data loss" is measured on: the parent's own validation
rows, chosen by the parent's split seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from .. import config as config_lib, runs
from ..prep.binarize import TokenFileError, read_token_file
from . import checkpoint, data as data_lib, model as model_lib
from .sampling import make_sampler, sample_from_id
from .sharding import Placement

KEY_MODEL = 0  # the model-init stream of a run's root key (shared with train.py)


class FinetuneError(config_lib.ConfigError):
    """The parent run cannot be used; the message names it and the fix."""


def resolve(cfg: config_lib.Config) -> config_lib.Config:
    """`cfg` with model D/L/H/V and the `parent` section read from `model.load_path`."""
    if not cfg.model.load_path:
        return cfg
    parent_dir = Path(cfg.model.load_path)
    summary = runs.read_summary(parent_dir)
    if summary is None or summary.get("status") != "finished":
        state = "has no summary.json" if summary is None else f"ended with status {summary.get('status')}"
        raise FinetuneError(
            f"model.load_path={parent_dir} is not a finished run ({state}); "
            f"finish (or --resume) that run first, or point at another run folder"
        )
    parent = config_lib.from_dict(runs.read_config(parent_dir))
    given = config_lib.given_keys(cfg)
    clash = [
        k
        for k in config_lib.ARCHITECTURE
        if f"model.{k}" in given and getattr(cfg.model, k) != getattr(parent.model, k)
    ]
    if clash:
        values = ", ".join(
            f"model.{k}={getattr(cfg.model, k)} (parent: {getattr(parent.model, k)})" for k in clash
        )
        raise FinetuneError(
            f"{values}: a finetune keeps the architecture of its parent {parent_dir}; remove "
            f"{', '.join(f'model.{k}' for k in clash)} from the finetune's config and overrides "
            f"(it is read from the parent), or pretrain a parent of that size"
        )
    if cfg.data.T != parent.data.T:
        raise FinetuneError(
            f"data.T={cfg.data.T} but the parent {parent_dir} was trained with "
            f"T={parent.data.T}; set data.T={parent.data.T} (old-data rows are cut "
            f"with the parent's T)"
        )
    return cfg.replace(
        {
            **from_parent_config(parent),
            "parent.seed": parent.parent.seed if parent.model.load_path else parent.run.seed,
            "parent.final_valid_ntp": summary["final"]["valid_ntp"],
            "parent.dataset_token": summary.get("dataset_token", -1),
            "parent.tokenizer_fingerprint": summary.get("tokenizer_fingerprint")
            or _data_fingerprint(parent.data.path),
        }
    )


def from_parent_config(parent: config_lib.Config) -> dict[str, Any]:
    """The overrides a finetune takes from its parent's config alone: the architecture
    (model D/L/H/V) and the parent's data split (its valid rows are the `prev` set)."""
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
    path = Path(cfg.model.load_path)
    _, abstract = model_lib.abstract_params(cfg.model)
    stored, _ = checkpoint.load(path / runs.CHECKPOINT, {"params": abstract})
    params = jax.device_put(stored["params"])
    _, init = model_lib.init_model(
        cfg.model, key=jax.random.fold_in(jax.random.key(cfg.parent.seed), KEY_MODEL)
    )
    distance = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, params, init)))
    if placement is not None and placement.mesh is not None:
        params = placement.put(stored["params"])
    return Parent(path=path, params=params, init_distance=distance)


def load_run(run_dir: str | Path) -> tuple[config_lib.Config, Any, Any]:
    """(resolved config, model graphdef, parameters) of a run folder's latest checkpoint; a LoRA
    run's checkpoint holds merged weights, so this is the model the run ended with."""
    run_dir = Path(run_dir)
    cfg = config_lib.from_dict(runs.read_config(run_dir))
    graphdef, abstract = model_lib.abstract_params(cfg.model)
    stored, _ = checkpoint.load(run_dir / runs.CHECKPOINT, {"params": abstract})
    return cfg, graphdef, jax.device_put(stored["params"])


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
