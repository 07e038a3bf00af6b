"""Multiple-choice accuracy by log-likelihood (lm-eval-harness's `acc`), for the benchmark
questions of prep/benchmarks.py (MMLU, ARC-Challenge, CommonsenseQA; their prompt formats are
documented there).

A question's score for each choice is the sum of the log-probabilities of the choice's tokens
(the continuation) after its prompt; the prediction is the best-scoring choice (the first on a
tie), accuracy the fraction of questions predicted right; the chance level is the mean of
1 / (number of choices).

Every row starts with the model's row-start token (our runs: the data's dataset-id token;
Hugging Face models: BOS). Prompt and continuation are tokenised apart and their ids
concatenated, so the continuation's tokens are exactly its own. A row holds the start token, the
prompt and the continuation but its last token (which is only predicted), as lm-eval-harness
feeds them; a row longer than T loses prompt tokens on its left (the start token stays). When
every choice of a question is one token (MMLU's letters), their rows are the same, the prompt
alone: one row scores them all at its last position. Rows are padded on the right (causal:
padding changes nothing before it) to a width, the next power of 2 of their length (at least
MIN_WIDTH, at most T), and scored by one jitted `lax.scan` per width over batches of as many
tokens as `batch_rows` rows of T: short ARC and CommonsenseQA rows cost their own length, not T.
`Suite` encodes a set of benchmarks once and scores them for any parameters, its programs
compiled once (a run compiles them with its train step). Log-probabilities are float32, computed
only at the scored positions (logits [chunk_rows(), V] at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..prep.benchmarks import BenchmarkError, Question, chance, load_benchmark, parse_benchmarks
from ..prep.tokenizer import load_tokenizer
from . import sharding
from .losses import chunk_rows
from .sharding import Placement

MIN_WIDTH = 64  # the narrowest rows scored (shorter rows are padded to it)


class TextEncoder(Protocol):
    def encode_one(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Scorer:
    """Log-probabilities of chosen tokens at chosen positions of rows, batched."""

    T: int  # longest row in tokens: longer prompts lose tokens on their left
    batch_rows: int  # rows of T tokens per batch (rows of W < T tokens: T / W times as many)
    # (params, tokens [nb, Bs, W], positions [nb, Bs, K], targets [nb, Bs, K]) -> [nb, Bs, K]
    # float32: log p(targets | the row's tokens up to and including positions) (jitted)
    score: Callable


def make_scorer(hidden: Callable, T: int, batch_rows: int) -> Scorer:
    """A Scorer for the model `hidden(params, tokens [B, T]) -> (hidden [B, T, D], unembed [D, V])`
    (engine/model.make_hidden). Logits only at the scored positions, in chunks of `chunk_rows()`."""

    def score(params: Any, tokens: jax.Array, positions: jax.Array, targets: jax.Array) -> jax.Array:
        def body(_: None, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[None, jax.Array]:
            batch, pos, target = xs  # [Bs, W], [Bs, K], [Bs, K]
            h, unembed = hidden(params, batch)  # [Bs, W, D], [D, V]
            picked = jnp.take_along_axis(h, pos[..., None], axis=1)  # [Bs, K, D]
            flat = (picked.reshape(-1, picked.shape[-1]), target.reshape(-1))  # [Bs K, D], [Bs K]
            logp = jax.lax.map(partial(_log_prob, unembed), flat, batch_size=chunk_rows())  # [Bs K]
            return None, logp.reshape(target.shape)

        return jax.lax.scan(body, None, (tokens, positions, targets))[1]

    return Scorer(T, batch_rows, jax.jit(score))


def _log_prob(unembed: jax.Array, xs: tuple[jax.Array, jax.Array]) -> jax.Array:
    h, target = xs  # [D], []
    logits = jnp.einsum("d,dv->v", h, unembed.astype(h.dtype), preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits)[target]


@dataclass(frozen=True)
class Encoded:
    """Questions as rows to score: slot k of row r adds log p(targets[r, k] | tokens[r, :p + 1]),
    p = positions[r, k], to the score of choice `slots[r, k]` (question * C + choice; -1: none)."""

    tokens: np.ndarray  # [n, T] int32, zero after each row's length
    lengths: np.ndarray  # [n] int
    positions: np.ndarray  # [n, K] int32
    targets: np.ndarray  # [n, K] int32
    slots: np.ndarray  # [n, K] int64
    num_choices: np.ndarray  # [Q] int
    answers: np.ndarray  # [Q] int


def encode(questions: Sequence[Question], tokenizer: TextEncoder, start_token: int, T: int) -> Encoded:
    """Tokenise `questions` into rows of at most T tokens (see the module docstring)."""
    C = max(len(q.continuations) for q in questions)
    rows, slots = [], []  # slots per row: (position, target token, choice slot)
    known: dict[str, list[int]] = {}  # continuations repeat (MMLU's letters)
    for i, q in enumerate(questions):
        prompt = tokenizer.encode_one(q.prompt)
        for text in q.continuations:
            if text not in known:
                known[text] = tokenizer.encode_one(text)
        choices = [known[text] for text in q.continuations]
        if min(map(len, choices)) == 0 or max(map(len, choices)) > T:
            raise BenchmarkError(f"question {i}: a choice is 0 or more than T={T} tokens: {q.continuations}")
        # a row: the start token, the prompt's last tokens, the choice but its last token (a target
        # only), at most T tokens; the choice's first token is scored at the prompt's last position
        if max(map(len, choices)) == 1:  # the choices' rows would all be the same: one row
            ids = [start_token, *_tail(prompt, T - 1)]
            rows.append(ids)
            slots.append([(len(ids) - 1, c[0], i * C + j) for j, c in enumerate(choices)])
            continue
        for j, c in enumerate(choices):
            context = [start_token, *_tail(prompt, T - len(c))]
            rows.append(context + c[:-1])
            slots.append([(len(context) - 1 + k, token, i * C + j) for k, token in enumerate(c)])
    K = max(map(len, slots))
    out = Encoded(
        tokens=np.zeros((len(rows), T), np.int32),
        lengths=np.array([len(ids) for ids in rows]),
        positions=np.zeros((len(rows), K), np.int32),
        targets=np.zeros((len(rows), K), np.int32),
        slots=np.full((len(rows), K), -1, np.int64),
        num_choices=np.array([len(q.continuations) for q in questions]),
        answers=np.array([q.answer for q in questions]),
    )
    for r, (ids, row_slots) in enumerate(zip(rows, slots)):
        out.tokens[r, : len(ids)] = ids
        for k, (pos, token, slot) in enumerate(row_slots):
            out.positions[r, k], out.targets[r, k], out.slots[r, k] = pos, token, slot
    return out


def _tail(ids: list[int], n: int) -> list[int]:
    """The last n of `ids` (all of them if fewer): a prompt cut on its left."""
    return ids[max(len(ids) - n, 0) :]


class Suite:
    """Benchmarks encoded once, scored for any parameters: `suite(params)` -> {"mc_<name>": accuracy,
    "mc_<name>_chance": chance level, ..., "mc_mean": mean accuracy, "mc_mean_chance"}."""

    def __init__(
        self,
        scorer: Scorer,
        tokenizer: TextEncoder,
        start_token: int,
        benchmarks: Mapping[str, Sequence[Question]],
        placement: Placement | None = None,
    ):
        if not benchmarks or not all(benchmarks.values()):
            raise BenchmarkError("a suite needs at least one benchmark, each with at least one question")
        self.scorer, self.benchmarks = scorer, {k: list(v) for k, v in benchmarks.items()}
        self.placement = placement or Placement()
        questions = [q for qs in self.benchmarks.values() for q in qs]
        self.encoded = encode(questions, tokenizer, start_token, scorer.T)
        e = self.encoded
        # rows grouped by width (the next power of 2 >= their length, >= MIN_WIDTH, <= T): a
        # program per width, compiled once, with as many tokens per batch as batch_rows rows of T
        widths = np.minimum(scorer.T, np.maximum(MIN_WIDTH, 2 ** np.ceil(np.log2(e.lengths)))).astype(int)
        self.groups = {int(W): np.flatnonzero(widths == W) for W in np.unique(widths)}
        self.arrays = {W: self._batches(W, rows) for W, rows in self.groups.items()}
        self._compiled: dict[int, Callable] = {}

    def _batches(self, W: int, rows: np.ndarray) -> tuple[Any, Any, Any]:
        """Device arrays (tokens [nb, Bs, W], positions, targets [nb, Bs, K]) of `rows` of width W."""
        e, place = self.encoded, self.placement
        per_batch = min(max(1, self.scorer.batch_rows * self.scorer.T // W), len(rows))  # no empty batch
        per_batch = math.ceil(per_batch / place.batch_devices) * place.batch_devices
        nb = math.ceil(len(rows) / per_batch)

        def batched(x: np.ndarray) -> Any:  # [n, ...] -> [nb, Bs, ...], padding rows of zeros
            x = np.concatenate([x, np.zeros((nb * per_batch - len(x), *x.shape[1:]), x.dtype)])
            x = x.reshape(nb, per_batch, *x.shape[1:])
            return place.rows(lambda a, b: x[:, a:b], x.shape, axis=1)

        return batched(e.tokens[rows, :W]), batched(e.positions[rows]), batched(e.targets[rows])

    def compile(self, params: Any) -> None:
        """Compile the scorer ahead of time for `params` (arrays or `jax.ShapeDtypeStruct`s)."""
        with self.placement.active():
            for W, arrays in self.arrays.items():
                self._compiled[W] = self.scorer.score.lower(params, *arrays).compile()

    def scores(self, params: Any) -> np.ndarray:
        """[Q, C] float64: each question's score per choice (-inf past its choices), all benchmarks."""
        e = self.encoded
        logp = np.zeros(e.slots.shape)  # [n, K]
        for W, rows in self.groups.items():
            out = sharding.to_host(self._compiled.get(W, self.scorer.score)(params, *self.arrays[W]))
            logp[rows] = np.asarray(out, np.float64).reshape(-1, e.slots.shape[1])[: len(rows)]
        C = int(e.num_choices.max())
        out = np.zeros(len(e.answers) * C)
        used = e.slots >= 0
        np.add.at(out, e.slots[used], logp[used])
        out = out.reshape(-1, C)
        out[np.arange(C)[None, :] >= e.num_choices[:, None]] = -np.inf
        return out

    def __call__(self, params: Any) -> dict[str, float]:
        correct = np.argmax(self.scores(params), axis=1) == self.encoded.answers  # [Q]
        out, start = {}, 0
        for name, questions in self.benchmarks.items():
            out[f"mc_{name}"] = float(correct[start : start + len(questions)].mean())
            out[f"mc_{name}_chance"] = chance(questions)
            start += len(questions)
        out["mc_mean"] = float(np.mean([out[f"mc_{name}"] for name in self.benchmarks]))
        out["mc_mean_chance"] = float(np.mean([out[f"mc_{name}_chance"] for name in self.benchmarks]))
        return out


def accuracy(
    scorer: Scorer, params: Any, tokenizer: TextEncoder, start_token: int, questions: Sequence[Question]
) -> float:
    """The fraction of `questions` whose best-scoring choice is the answer (a one-off `Suite`)."""
    return Suite(scorer, tokenizer, start_token, {"q": questions})(params)["mc_q"]


def run_suite(
    mc_evals: str,
    limit: int,
    sidecar: Mapping[str, Any],
    data_path: str | Path,
    hidden: Callable,
    T: int,
    batch_rows: int,
    placement: Placement | None = None,
) -> Suite:
    """A run's suite (`log.mc_evals`, `log.mc_limit`: 0 = all): questions tokenised with the
    tokenizer of the run's training data (`sidecar` of `data_path`), rows started with its
    dataset-id token, batches of the run's T and eval batch rows."""
    folder = sidecar.get("tokenizer_dir")
    if not folder:
        raise BenchmarkError(
            f"log.mc_evals: {data_path} records no tokenizer_dir in its sidecar, so the benchmarks "
            f"cannot be tokenised; binarize the data with a tokenizer, or unset log.mc_evals"
        )
    tokenizer = load_tokenizer(folder)
    benchmarks = {
        name: load_benchmark(name, spec, limit) for name, spec in parse_benchmarks(mc_evals).items()
    }
    scorer = make_scorer(hidden, T, batch_rows)
    return Suite(scorer, tokenizer, int(sidecar["dataset_token"]), benchmarks, placement)
