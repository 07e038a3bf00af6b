"""Token files as rows: split once into train/valid, batches as pure functions of the step.

A token file of n tokens (uint16 or uint32, as its sidecar says) is cut into n // T non-overlapping
rows of T tokens, handed on as int32. Position 0 of every row is overwritten with the file's
dataset-id token (from its sidecar; BOS for a Hugging Face tokenizer), so a model learns
p(text | dataset id). The rows are split into train and valid by `split_seed` alone, so a
finetuning run that reuses the parent's split seed measures "old-data loss" on the same rows the
parent was validated on.

Batch b of a run with seed s holds the train rows at global positions b*B .. b*B+B-1 of an
endless sequence of epoch permutations (epoch e permuted by (s, stream, e)). A batch is thus a
pure function of (seed, step): resuming needs only the step, and runs are reproducible.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..prep.binarize import read_token_file

# Independent random streams derived from the run seed (numpy side of the named-key scheme).
STREAM_TRAIN, STREAM_MIX, STREAM_REPLAY, STREAM_REUSE = 1, 2, 3, 4


class DataError(ValueError):
    """A dataset cannot serve the requested rows; the message names the file and the fix."""


@dataclass(frozen=True)
class TokenRows:
    """A token file viewed as rows of T tokens, split into train and valid row indices."""

    path: Path
    sidecar: dict[str, Any]
    tokens: np.ndarray  # [num_tokens] uint16 or uint32 (the sidecar's dtype), memory-mapped
    T: int  # row length in tokens
    train_rows: np.ndarray  # [n_train] row indices (sorted)
    valid_rows: np.ndarray  # [n_valid] row indices (sorted), disjoint from train_rows
    split_seed: int

    @property
    def dataset_token(self) -> int:
        return int(self.sidecar["dataset_token"])

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows by index -> int32 [len(indices), T], position 0 set to the dataset-id token."""
        starts = np.asarray(indices, dtype=np.int64) * self.T
        out = self.tokens[starts[:, None] + np.arange(self.T)].astype(np.int32)  # [n, T]
        out[:, 0] = self.dataset_token
        return out


def open_rows(
    path: str | Path,
    *,
    T: int,
    valid_tokens: int,
    split_seed: int,
    vocab_size: int,
    expected_fingerprint: str | None = None,
    min_train_rows: int = 1,
) -> TokenRows:
    """Memory-map a token file as rows and split them; errors name the file and the fix."""
    path = Path(path)
    tokens, sidecar = read_token_file(path, expected_fingerprint=expected_fingerprint)
    if int(sidecar["vocab_size"]) > vocab_size:
        raise DataError(
            f"{path}: its tokenizer has {sidecar['vocab_size']} ids but model.V={vocab_size}; "
            f"set model.V >= {sidecar['vocab_size']}"
        )
    if not 0 <= int(sidecar["dataset_token"]) < vocab_size:
        raise DataError(
            f"{path}: its sidecar's dataset_token {sidecar['dataset_token']} is outside "
            f"the vocabulary 0..{vocab_size - 1}; re-binarize the file"
        )
    n_rows = len(tokens) // T
    n_valid = math.ceil(valid_tokens / T) if valid_tokens > 0 else 0
    if n_rows - n_valid < min_train_rows:
        raise DataError(
            f"{path}: {len(tokens):,} tokens make {n_rows} rows of T={T}; {n_valid} are held out for "
            f"validation (valid_tokens={valid_tokens:,}), leaving {max(n_rows - n_valid, 0)} train rows "
            f"but at least {min_train_rows} are needed; use a larger corpus, a smaller T, batch size "
            f"or valid_tokens"
        )
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise DataError(
            f"{path}: holds token id {int(tokens.max())} >= model.V={vocab_size}; "
            f"re-binarize with the matching tokenizer or raise model.V"
        )
    perm = np.random.default_rng(split_seed).permutation(n_rows)
    return TokenRows(
        path=path,
        sidecar=sidecar,
        tokens=tokens,
        T=T,
        train_rows=np.sort(perm[n_valid:]),
        valid_rows=np.sort(perm[:n_valid]),
        split_seed=split_seed,
    )


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, epoch]).permutation(n)


def positions_to_rows(
    train_rows: np.ndarray, first: int, count: int, *, seed: int, stream: int
) -> np.ndarray:
    """Row indices at global positions first..first+count-1 of the endless epoch sequence."""
    n = len(train_rows)
    epochs, offsets = np.divmod(np.arange(first, first + count), n)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = train_rows[_epoch_permutation(seed, stream, int(epoch), n)[offsets[sel]]]
    return out


@dataclass(frozen=True)
class Batcher:
    """Training batches as a function of the step: (B - m) rows of `main`, m rows of `mix`."""

    main: TokenRows
    batch_size: int
    seed: int
    mix: TokenRows | None = None
    mix_rows: int = 0  # m: rows per batch drawn from `mix`

    def batch(self, step: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int32 [B, T] for this step, or only its rows start..stop-1 (only those are read: each
        process of a multi-host run reads the rows its devices hold)."""
        stop = self.batch_size if stop is None else stop
        n_main = self.batch_size - self.mix_rows
        idx = positions_to_rows(
            self.main.train_rows, step * n_main, n_main, seed=self.seed, stream=STREAM_TRAIN
        )
        rows = self.main.rows(idx[start:stop])
        if self.mix is None or self.mix_rows == 0:
            return rows
        mix_idx = positions_to_rows(
            self.mix.train_rows, step * self.mix_rows, self.mix_rows, seed=self.seed, stream=STREAM_MIX
        )
        mix = self.mix.rows(mix_idx[max(start - n_main, 0) : max(stop - n_main, 0)])
        return np.concatenate([rows, mix], axis=0)

    def epochs(self, step: int) -> float:
        """Passes over the main train rows completed after `step` steps."""
        return step * (self.batch_size - self.mix_rows) / len(self.main.train_rows)


def mix_row_count(batch_size: int, fraction: float) -> int:
    """Rows of each batch taken from the mix file: round(fraction * B), at least 1 if fraction > 0."""
    if fraction <= 0:
        return 0
    return min(batch_size - 1, max(1, round(fraction * batch_size)))


def eval_batches(
    rows: TokenRows, eval_batch_size: int, *, which: str = "valid", multiple: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """All validation rows as [nb, Be, T] int32 plus a [nb, Be] float32 mask (0 = padding row)."""
    indices = rows.valid_rows if which == "valid" else rows.train_rows
    if len(indices) == 0:
        raise DataError(f"{rows.path}: no {which} rows to evaluate on; set a positive valid_tokens")
    return batched(rows.rows(indices), eval_batch_size, multiple)


def batched(rows: np.ndarray, batch_size: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, T] (n >= 1) as [nb, Be, T] batches of Be = min(batch_size, n rounded up to a
    `multiple`) rows plus a [nb, Be] float32 mask (0 = padding row: padding repeats early rows,
    which the mask zeroes). A mesh splits every batch's Be rows over its `multiple` devices."""
    n, T = rows.shape
    Be = min(batch_size, math.ceil(n / multiple) * multiple)
    nb = math.ceil(n / Be)
    padded = rows[np.resize(np.arange(n), nb * Be)]
    mask = (np.arange(nb * Be) < n).astype(np.float32)
    return padded.reshape(nb, Be, T), mask.reshape(nb, Be)  # [nb, Be, T], [nb, Be]
