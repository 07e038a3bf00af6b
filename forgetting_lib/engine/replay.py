"""Replay sources: where old-distribution rows come from (and the diagonal Fisher on them).

Sources (each yields [R, T] rows of the parent's distribution for a given step):
- `RealReplay`: the parent's own *train* rows (disjoint from the `prev` validation rows).
- `SelfGeneratedReplay`: rows sampled from the frozen parent, prompted with only the parent's
  dataset-id token, at temperature 1 with the KV cache, never stopping early. Rows are sampled in
  chunks of buffer x R and each is used once (pseudo-rehearsal, Robins 1995, with the model as its
  own generator). Both are pure functions of the step, so resumed runs replay the same rows.
  Ablations (not the paper's setting): `temperature`, `top_p` (nucleus sampling) and `reuse`
  (each chunk replayed in `reuse` passes, reshuffled after the first, so 1/reuse as many rows
  are sampled).

The methods that use these rows (`reg.method`) are the registry in `regularisers.py`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import runtime
from .data import STREAM_REPLAY, STREAM_REUSE, TokenRows, positions_to_rows
from .losses import ntp_from_hidden
from .sampling import make_sampler, prompt_ids, sample_from_id
from .sharding import Placement


@dataclass
class RealReplay:
    """The parent's real train rows, R per step, in an endless sequence of epoch permutations."""

    rows: TokenRows
    batch_size: int
    seed: int
    sample_time_s: float = 0.0  # always 0: nothing is generated
    sampled_rows: int = 0

    def ready(self, step: int) -> bool:
        return True  # rows are read, never sampled

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
    """Rows sampled from the frozen parent; refilled every `buffer` x `reuse` steps.

    Chunk c ([buffer, R, T] rows, sampled with the key `fold_in(key, c)`) serves the `span` =
    buffer x reuse steps c * span .. c * span + span - 1: in its first pass step c * span + j
    replays its rows [j]; in pass p >= 1 the chunk's buffer x R rows in the order of a permutation
    drawn from (seed, STREAM_REUSE, c, p), R at a time. The parent is frozen, so when and with
    which other chunks a chunk is sampled does not change it: `chunks_per_call` chunks are sampled
    in one call (a batch that fills the machine, `auto_chunks_per_call`), and a chunk is the same
    however it was grouped.
    """

    graphdef: Any
    params: Any  # the frozen parent (never the model being trained)
    prompt: int | tuple[int, ...]  # the parent's dataset-id token (BOS for a Hugging Face model), or
    # a prompt of several tokens (a chat template's): every sampled row starts with it
    batch_size: int  # R rows per step
    T: int
    buffer: int
    key: jax.Array
    temperature: float = 1.0
    chunks_per_call: int = 1
    top_p: float = 1.0  # nucleus sampling mass (1 = the full softmax)
    reuse: int = 1  # passes over each chunk (1 = each row replayed once)
    seed: int = 0  # the run seed: the order of the passes after the first
    placement: Placement = field(default_factory=Placement)  # on a mesh, rows are sampled split over it
    sample_time_s: float = 0.0
    sampled_rows: int = 0
    _chunks: dict[int, jax.Array] = field(default_factory=dict, repr=False)  # chunk -> [buffer, R, T]
    _sampler: Callable | None = field(default=None, repr=False)

    @property
    def span(self) -> int:
        """Steps served by one chunk."""
        return self.buffer * self.reuse

    def ready(self, step: int) -> bool:
        """Whether the rows of `step` are already sampled (asking for them will not sample)."""
        return step // self.span in self._chunks

    def batch(self, step: int) -> jax.Array:
        chunk_index, offset = divmod(step, self.span)
        if chunk_index not in self._chunks:
            self._refill(chunk_index)
        rows = self._chunks[chunk_index]  # [buffer, R, T]
        replay_pass, slot = divmod(offset, self.buffer)
        if replay_pass == 0:
            return rows[slot]  # [R, T]
        n = self.buffer * self.batch_size
        order = np.random.default_rng((self.seed, STREAM_REUSE, chunk_index, replay_pass)).permutation(n)
        return rows.reshape(n, self.T)[order[slot * self.batch_size : (slot + 1) * self.batch_size]]

    def sampled_steps(self) -> int:
        """Steps whose rows the next sampler call provides without sampling again (from step 0)."""
        return self.chunks_per_call * self.span

    def compile(self) -> None:
        """Compile the sampler ahead of time for this source's call shape (outside train time)."""
        rows = self.chunks_per_call * self.buffer * self.batch_size
        self.placement.check_rows(rows, "self-generated replay rows per sampler call")
        shape = (rows, len(prompt_ids(self.prompt)))
        prompt = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.placement.rows_sharding())
        keys = jax.ShapeDtypeStruct((self.chunks_per_call,), self.key.dtype)  # self._keys(first)
        if self.placement.mesh is not None:
            keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=self.placement.replicated())
        self._sampler = self._jitted().lower(self.params, prompt, keys).compile()

    def _jitted(self) -> Callable:
        return make_sampler(self.graphdef, length=self.T, temperature=self.temperature, top_p=self.top_p)

    def _keys(self, first: int) -> jax.Array:
        """The keys [chunks_per_call] of chunks first, first + 1, ..."""
        return jax.vmap(lambda c: jax.random.fold_in(self.key, c))(first + jnp.arange(self.chunks_per_call))

    def _refill(self, first: int) -> None:
        """Sample chunks first .. first + chunks_per_call - 1 in one call."""
        if self._sampler is None:
            self._sampler = self._jitted()
        G, shape = self.chunks_per_call, (self.chunks_per_call, self.buffer, self.batch_size, self.T)
        start = time.perf_counter()
        n = math.prod(shape[:3])
        if self.placement.mesh is None:
            rows = sample_from_id(self._sampler, self.params, self.prompt, n, self._keys(first))
        else:  # prompts split over the mesh, keys on every device
            ids = prompt_ids(self.prompt)
            prompt = self.placement.rows(
                lambda a, b: np.broadcast_to(ids, (b - a, len(ids))).astype(np.int32), (n, len(ids))
            )
            keys = jax.jit(self._keys, out_shardings=self.placement.replicated())(first)
            rows = self._sampler(self.params, prompt, keys)
        rows = rows.reshape(shape).block_until_ready()  # [G, buffer, R, T]
        self._chunks = {first + g: rows[g] for g in range(G)}
        self.sample_time_s += time.perf_counter() - start
        self.sampled_rows += math.prod(shape[:3])


SAMPLE_ROWS = 256  # rows per sampler call on a CPU (4x on accelerators)
SAMPLE_CACHE_BYTES = 2**30  # bound on the sampler's KV cache per call


def auto_chunks_per_call(chunk_rows: int, chunks: int | None, cache_bytes_per_row: int) -> int:
    """Replay chunks (`chunk_rows` rows each) to sample per sampler call: enough for about
    `SAMPLE_ROWS` rows per call (on a 2-core CPU 256 rows decode at 1.13x the tokens/s of 128,
    512 at 1.14x, benchmarks/sampling.py; a run that stops early, at its target loss, wastes the
    rest of its last call), never more than the run's `chunks` (None: unknown length) nor a KV
    cache over `SAMPLE_CACHE_BYTES`."""
    target = SAMPLE_ROWS if runtime.platform() == "cpu" else 4 * SAMPLE_ROWS
    rows = min(target, SAMPLE_CACHE_BYTES // max(cache_bytes_per_row, 1))
    return max(1, min(rows // chunk_rows, chunks or rows))


def diagonal_fisher(hidden: Callable, params: Any, batches: list[Any]) -> Any:
    """Diagonal Fisher: the mean over rows of the squared per-row gradient of the NTP loss.

    On self-generated rows (tokens drawn from the model itself) this is the true Fisher of the
    model's own distribution; on real rows it is the empirical Fisher.
    """

    def row_grad_sq(params: Any, row: jax.Array) -> Any:
        grad = jax.grad(lambda p: jnp.mean(ntp_from_hidden(*hidden(p, row[None]), row[None])))(params)
        return jax.tree.map(jnp.square, grad)

    @jax.jit
    def batch_sum(params: Any, rows: jax.Array) -> Any:  # params an argument: they may be sharded
        def body(acc, row):
            return jax.tree.map(jnp.add, acc, row_grad_sq(params, row)), None

        zero = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.scan(body, zero, rows)[0]

    total = None
    count = 0
    for rows in batches:
        part = batch_sum(params, rows if isinstance(rows, jax.Array) else jnp.asarray(rows))
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        count += len(rows)
    return jax.tree.map(lambda x: x / count, total)
