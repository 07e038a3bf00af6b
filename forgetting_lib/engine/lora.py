"""LoRA: low-rank adapters on every non-embedding matrix, as a finetuning baseline.

For a weight W viewed as [fan_in, fan_out], the adapted weight is W + A @ B with
A [fan_in, r] ~ N(0, 1/fan_in) and B [r, fan_out] = 0, so at the start the adapted model equals
the base model exactly. Only A and B are trained; `merge` gives the full parameter tree, which is
what a LoRA run's checkpoint stores (so a LoRA run can itself be a parent).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ..config import ConfigError

# Block matrices and how many leading axes form their fan-in (see model.Block).
FAN_IN_AXES = {"qkv": 1, "q": 1, "kv": 1, "out": 2, "gate": 1, "up": 1, "down": 1}

Adapters = dict[str, dict[str, jax.Array]]  # "block.name" -> {"A": [in, r], "B": [r, out]}


class LoraError(ConfigError):
    """Invalid LoRA settings for this model; the message names the key."""


def _targets(params: Any) -> list[tuple[str, jax.Array]]:
    """(adapter name, weight) for every adapted matrix, keyed by block index and matrix name."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if len(keys) >= 3 and keys[0] == "blocks" and keys[2] in FAN_IN_AXES:
            found.append((f"{keys[1]}.{keys[2]}", leaf))
    return found


def _fans(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    axes = FAN_IN_AXES[name.split(".")[1]]
    return math.prod(shape[:axes]), math.prod(shape[axes:])


def init_adapters(params: Any, rank: int, *, key: jax.Array) -> Adapters:
    """Fresh adapters of `rank` for every block matrix of `params` (B = 0: no change at start)."""
    adapters: Adapters = {}
    for i, (name, weight) in enumerate(_targets(params)):
        fan_in, fan_out = _fans(name, weight.shape)
        if rank > min(fan_in, fan_out):
            raise LoraError(
                f"lora.rank={rank} exceeds the {fan_in}x{fan_out} matrix {name}; "
                f"use lora.rank <= {min(fan_in, fan_out)}"
            )
        a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32) / math.sqrt(fan_in)
        adapters[name] = {"A": a, "B": jnp.zeros((rank, fan_out), jnp.float32)}
    return adapters


def merge(base: Any, adapters: Adapters) -> Any:
    """`base` with W + A @ B on every adapted matrix (same tree structure as `base`)."""

    def add(path: tuple, leaf: jax.Array) -> jax.Array:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        name = f"{keys[1]}.{keys[2]}" if len(keys) >= 3 and keys[0] == "blocks" else None
        if name not in adapters:
            return leaf
        delta = adapters[name]["A"] @ adapters[name]["B"]  # [in, out]
        return leaf + delta.reshape(leaf.shape)

    return jax.tree_util.tree_map_with_path(add, base)


def count(adapters: Adapters) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(adapters))
