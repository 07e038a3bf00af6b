"""Synthetic token files with valid sidecars, so engine tests need no tokenizer.

Ids 0..FIRST_TEXT_ID-1 are reserved (dataset-id tokens live there, as with a real tokenizer);
text tokens are drawn from FIRST_TEXT_ID..vocab_size-1, so a row's position 0 after loading can be
told apart from any raw token.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from forgetting_lib.prep.binarize import DTYPES, FORMAT, sidecar_path

FIRST_TEXT_ID = 4


def write_token_file(
    path: str | Path,
    num_tokens: int,
    *,
    vocab_size: int = 64,
    dataset_token: int = 1,
    pattern: str = "cycle",
    seed: int = 0,
    tokens: np.ndarray | None = None,
    dtype: str = "uint16",
) -> Path:
    """Write `path` (.bin, `dtype`: uint16 or uint32) and its sidecar; returns the .bin path.

    pattern "cycle": the text ids in a fixed random order, repeated (each next token is a
    deterministic function of the current one: a bigram a 1-layer model learns to ~0 loss).
    pattern "random": i.i.d. uniform text ids (no two rows share content: rows are identifiable).
    `tokens` overrides the pattern with explicit ids.
    """
    path = Path(path)
    if tokens is None:
        rng = np.random.default_rng(seed)
        text_ids = np.arange(FIRST_TEXT_ID, vocab_size)
        if pattern == "cycle":
            order = rng.permutation(text_ids)
            tokens = np.resize(order, num_tokens)
        elif pattern == "random":
            tokens = rng.choice(text_ids, size=num_tokens)
        else:
            raise ValueError(f"unknown pattern {pattern!r}")
    tokens = np.asarray(tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens.astype(DTYPES[dtype]).tofile(path)
    sidecar = {
        "format": FORMAT,
        "dtype": dtype,
        "num_tokens": int(tokens.size),
        "num_documents": 1,
        "dataset_id": dataset_token,
        "dataset_token": dataset_token,
        "corpus": f"synthetic-test:{pattern}",
        "tokenizer_fingerprint": "synthetic",
        "tokenizer_dir": "",
        "vocab_size": vocab_size,
        "eos_id": 0,
        "max_tokens": None,
        "shuffle_documents": False,
        "seed": seed,
        "created": "2000-01-01T00:00:00+00:00",
    }
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return path
