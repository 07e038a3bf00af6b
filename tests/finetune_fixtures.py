"""A tiny pretrained parent and finetuning runs from it, shared by test_finetune and test_lora.

Two synthetic "languages" on V=64 ids: noisy bigram chains (each next token is a fixed
permutation of the current one with probability 0.8, uniform otherwise), with different
permutations and dataset-id tokens. The parent learns chain OLD in a few seconds; finetuning on
chain NEW overwrites it (large forgetting), which replay must prevent. The noise makes every
32-token row unique, so a row's content identifies it (replay rows can be traced to the split).

Runs are pure functions of their config, so every run is written once per session and later
requests return the finished run (train_and_evaluate(resume=True) on a finished folder).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forgetting_lib import config as config_lib
from forgetting_lib.engine.train import RunResult, train_and_evaluate

from tokenfiles import FIRST_TEXT_ID, write_token_file

V, T, B = 64, 32, 8
OLD_TOKEN, NEW_TOKEN = 1, 2  # dataset-id tokens of the parent's and the new data
PARENT_SPLIT_SEED, PARENT_SEED = 3, 0
PARENT_VALID_TOKENS = 32 * T  # 32 rows: one eval batch of the auto CPU size
PARENT_STEPS = 150
FT_STEPS, FT_EVAL_EVERY = 16, 4
NOISE_FREE = 0.8  # P(next token follows the chain): rows are all distinct

# microbatch_rows is set explicitly: auto_microbatches(8, 32) never returns (see test_finetune).
PARENT_CONFIG = {
    "run": {"seed": PARENT_SEED},
    "model": {"D": 32, "L": 2, "H": 16, "V": V, "dtype": "float32"},
    "data": {
        "T": T,
        "batch_size": B,
        "valid_tokens": PARENT_VALID_TOKENS,
        "split_seed": PARENT_SPLIT_SEED,
        "microbatch_rows": B,
    },
    "opt": {"lr": 3e-3, "warmup_tokens": 0},
    "stop": {"num_tokens_train": PARENT_STEPS * B * T},
    "log": {"every_tokens": 50 * B * T, "progress": False},
}


def successor_map(seed: int) -> np.ndarray:
    """[V] int: the chain's next token after each text id (a permutation of the text ids)."""
    ids = np.arange(FIRST_TEXT_ID, V)
    successor = np.zeros(V, np.int64)
    successor[ids] = np.random.default_rng([seed, 0]).permutation(ids)
    return successor


def noisy_chain(num_tokens: int, seed: int, p: float = NOISE_FREE) -> np.ndarray:
    """Tokens of a bigram chain over the text ids: next = successor[current] w.p. p, else uniform."""
    rng = np.random.default_rng([seed, 1])
    ids = np.arange(FIRST_TEXT_ID, V)
    successor = successor_map(seed)
    noise, uniform = rng.random(num_tokens) > p, rng.choice(ids, num_tokens)
    out = np.empty(num_tokens, np.int64)
    out[0] = ids[0]
    for i in range(1, num_tokens):
        out[i] = uniform[i] if noise[i] else successor[out[i - 1]]
    return out


@functools.lru_cache(maxsize=None)
def _build(root: Path) -> tuple[Path, Path, Path]:
    """(parent run folder, old token file, new token file) under `root`, built once per root."""
    old = write_token_file(
        root / "data" / "old.bin",
        0,
        vocab_size=V,
        dataset_token=OLD_TOKEN,
        tokens=noisy_chain(400 * T, seed=0),
    )
    new = write_token_file(
        root / "data" / "new.bin",
        0,
        vocab_size=V,
        dataset_token=NEW_TOKEN,
        tokens=noisy_chain(200 * T, seed=1),
    )
    parent = root / "parent"
    cfg = config_lib.from_dict(PARENT_CONFIG, [("data.path", str(old))])
    result = train_and_evaluate(cfg, parent, resume=True)
    assert result.status == "finished", result
    return parent, old, new


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> "World":
    """The shared parent run and data files (pretrained once per session, ~150 steps)."""
    return World(*_build(tmp_path_factory.getbasetemp() / "finetune_world"))


class World:
    """The parent run and helpers that write (or return) finetuning runs from it."""

    def __init__(self, parent: Path, old: Path, new: Path):
        self.parent, self.old, self.new = parent, old, new
        self.root = parent.parent

    def child_config(
        self, overrides: dict[str, Any] | None = None, *, parent: Path | None = None, steps: int = FT_STEPS
    ) -> config_lib.Config:
        """A finetuning config on the NEW data, architecture left at the defaults (the parent's
        must be read from the parent), split seed and valid size different from the parent's."""
        raw = {
            "run": {"seed": 5},
            "data": {
                "path": str(self.new),
                "T": T,
                "batch_size": B,
                "valid_tokens": 1000,
                "split_seed": 7,
                "microbatch_rows": B,
            },
            "model": {"load_path": str(parent or self.parent)},
            "opt": {"lr": 3e-3, "warmup_tokens": 0},
            "stop": {"num_tokens_train": steps * B * T},
            "log": {"every_tokens": FT_EVAL_EVERY * B * T, "progress": False},
        }
        return config_lib.from_dict(raw, list((overrides or {}).items()))

    def finetune(self, name: str, overrides: dict[str, Any] | None = None, **kw: Any) -> RunResult:
        """The finished run `name` (trained on first request)."""
        result = train_and_evaluate(self.child_config(overrides, **kw), self.root / name, resume=True)
        assert result.status == "finished", result
        return result
