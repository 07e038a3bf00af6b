"""Replay sources: where old-distribution rows come from (and the diagonal Fisher on them).

Sources (each yields [R, T] rows of the parent's distribution for a given step):
- `RealReplay`: the parent's own *train* rows (disjoint from the `prev` validation rows).
- `SelfGeneratedReplay`: rows sampled from the frozen parent, prompted with only the parent's
  dataset-id token, at temperature 1 with the KV cache, never stopping early. Rows are sampled in
  chunks of buffer x R and each is used once (pseudo-rehearsal, Robins 1995, with the model as its
  own generator). Both are pure functions of the step, so resumed runs replay the same rows.

The methods that use these rows (`reg.method`) are the registry in `regularisers.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .data import STREAM_REPLAY, TokenRows, positions_to_rows
from .losses import ntp_from_hidden
from .sampling import make_sampler, sample_from_id


@dataclass
class RealReplay:
    """The parent's real train rows, R per step, in an endless sequence of epoch permutations."""

    rows: TokenRows
    batch_size: int
    seed: int
    sample_time_s: float = 0.0  # always 0: nothing is generated

    def batch(self, step: int) -> np.ndarray:
        idx = positions_to_rows(
            self.rows.train_rows,
            step * self.batch_size,
            self.batch_size,
            seed=self.seed,
            stream=STREAM_REPLAY,
        )
        return self.rows.rows(idx)  # [R, T]


@dataclass
class SelfGeneratedReplay:
    """Rows sampled from the frozen parent; refilled every `buffer` steps, each row used once."""

    graphdef: Any
    params: Any  # the frozen parent (never the model being trained)
    dataset_token: int  # the parent's dataset-id token: the whole prompt
    batch_size: int  # R rows per step
    T: int
    buffer: int
    key: jax.Array
    temperature: float = 1.0
    sample_time_s: float = 0.0
    _chunk_index: int = -1
    _chunk: jax.Array | None = None
    _sampler: Callable | None = field(default=None, repr=False)

    def batch(self, step: int) -> jax.Array:
        chunk_index, offset = divmod(step, self.buffer)
        if chunk_index != self._chunk_index:
            self._refill(chunk_index)
        return self._chunk[offset]  # [R, T]

    def _refill(self, chunk_index: int) -> None:
        if self._sampler is None:
            self._sampler = make_sampler(self.graphdef, length=self.T, temperature=self.temperature)
        start = time.perf_counter()
        rows = sample_from_id(
            self._sampler,
            self.params,
            self.dataset_token,
            self.buffer * self.batch_size,
            jax.random.fold_in(self.key, chunk_index),
        )
        self._chunk = rows.reshape(self.buffer, self.batch_size, self.T).block_until_ready()
        self._chunk_index = chunk_index
        self.sample_time_s += time.perf_counter() - start


def diagonal_fisher(hidden: Callable, params: Any, batches: list[Any]) -> Any:
    """Diagonal Fisher: the mean over rows of the squared per-row gradient of the NTP loss.

    On self-generated rows (tokens drawn from the model itself) this is the true Fisher of the
    model's own distribution; on real rows it is the empirical Fisher.
    """

    def row_grad_sq(row: jax.Array) -> Any:
        grad = jax.grad(lambda p: jnp.mean(ntp_from_hidden(*hidden(p, row[None]), row[None])))(params)
        return jax.tree.map(jnp.square, grad)

    @jax.jit
    def batch_sum(rows: jax.Array) -> Any:
        def body(acc, row):
            return jax.tree.map(jnp.add, acc, row_grad_sq(row)), None

        zero = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.scan(body, zero, rows)[0]

    total = None
    count = 0
    for rows in batches:
        part = batch_sum(jnp.asarray(rows))
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        count += len(rows)
    return jax.tree.map(lambda x: x / count, total)
