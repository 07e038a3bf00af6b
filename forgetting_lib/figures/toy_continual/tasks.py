"""Four algorithmic tasks for continual learning, exact-match evaluation, and the CL metrics.

Token layout (vocabulary V = 19):

    0-9  digits               10 <add>   11 <reversal>   12 <sort>   13 <modadd>   (task BOS)
    14   "+"  (add, modadd)   15 ","  (reversal, sort)   16 "="   17 EOS   18 PAD

Every row has T = 16 tokens: a task's BOS, two 3-digit operands a, b (zero-padded, most
significant digit first) joined by that task's separator, "=", the answer, EOS, then PAD:

    position  0    1-3    4    5-7    8    9 ...       then EOS, PAD to T
              BOS  a      sep  b      =    answer
    add       a + b as 4 digits (zero-padded): <add> 4 5 6 + 7 8 9 = 1 2 4 5 EOS PAD PAD
    modadd    (a + b) mod 1000 as 3 digits
    reversal  the 6 question digits in reverse order
    sort      the 6 question digits in ascending order (the longest answer: 9 + 6 + 1 = T)

The prompt of a problem is its first P = 9 tokens (BOS up to and including "="), the same length
for every task, so all tasks are evaluated in one decode call. Training uses the next-token loss
over the *whole* row (the library objective, unmasked): question digits are uniform (a constant
ln 10 floor per digit, no harm), and self-generated replay needs exactly this, since rows
sampled from a BOS token alone are only valid problems if the model has learned the question
distribution as well as the answers. PAD after EOS is deterministic and costs nothing to learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

DIGITS = 10
PLUS, COMMA, EQ, EOS, PAD = 14, 15, 16, 17, 18
V, T, PROMPT = 19, 16, 9  # vocabulary, row length, prompt length (BOS .. "=")
OPERAND_DIGITS = 3


@dataclass(frozen=True)
class Task:
    name: str
    bos: int
    sep: int
    answer_len: int
    answer: Callable[[jax.Array, jax.Array], jax.Array]  # a, b digits [B, 3] -> answer [B, A]


def _to_int(digits: jax.Array) -> jax.Array:
    """Digits [B, n], most significant first -> integers [B]."""
    weights = 10 ** jnp.arange(digits.shape[1] - 1, -1, -1, dtype=jnp.int32)  # [n]
    return jnp.sum(digits * weights[None, :], axis=1)


def _to_digits(values: jax.Array, n: int) -> jax.Array:
    """Integers [B] -> n digits [B, n], most significant first, zero-padded."""
    weights = 10 ** jnp.arange(n - 1, -1, -1, dtype=jnp.int32)  # [n]
    return (values[:, None] // weights[None, :]) % 10


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("add", 10, PLUS, 4, lambda a, b: _to_digits(_to_int(a) + _to_int(b), 4)),
        Task("reversal", 11, COMMA, 6, lambda a, b: jnp.concatenate([a, b], axis=1)[:, ::-1]),
        Task("sort", 12, COMMA, 6, lambda a, b: jnp.sort(jnp.concatenate([a, b], axis=1), axis=1)),
        Task("modadd", 13, PLUS, 3, lambda a, b: _to_digits((_to_int(a) + _to_int(b)) % 1000, 3)),
    )
}
PAPER_TASKS = ("add", "reversal", "sort", "modadd")


def make_rows(task: str, batch: int, *, key: jax.Array) -> jax.Array:
    """`batch` fresh random problems of `task` as full rows [batch, T] int32 (jit-able)."""
    spec = TASKS[task]
    a, b = jax.random.randint(key, (2, batch, OPERAND_DIGITS), 0, DIGITS, jnp.int32)  # [B, 3] each
    col = lambda v: jnp.full((batch, 1), v, jnp.int32)  # noqa: E731
    row = jnp.concatenate(
        [col(spec.bos), a, col(spec.sep), b, col(EQ), spec.answer(a, b).astype(jnp.int32), col(EOS)], axis=1
    )
    return jnp.pad(row, ((0, 0), (0, T - row.shape[1])), constant_values=PAD)  # [B, T]


def parse_row(row) -> tuple[str, int, int, list[int]]:
    """(task, a, b, answer digits) of one row; for tests and for reading samples."""
    row = [int(t) for t in row]
    task = next(t.name for t in TASKS.values() if t.bos == row[0])
    a = int("".join(map(str, row[1:4])))
    b = int("".join(map(str, row[5:8])))
    end = row.index(EOS, PROMPT)
    return task, a, b, row[PROMPT:end]


def reference_answer(task: str, a: int, b: int) -> list[int]:
    """The answer digits in plain Python arithmetic (the tests' ground truth)."""
    digits = [int(c) for c in f"{a:03d}{b:03d}"]
    if task == "add":
        return [int(c) for c in f"{a + b:04d}"]
    if task == "modadd":
        return [int(c) for c in f"{(a + b) % 1000:03d}"]
    return digits[::-1] if task == "reversal" else sorted(digits)


# ---- exact-match evaluation -------------------------------------------------------------------

Decode = Callable[[jax.Array], jax.Array]  # prompts [N, PROMPT] -> completed rows [N, T]


def answer_mask(rows: jax.Array) -> jax.Array:
    """[N, T] bool: the answer positions and the first EOS after the prompt (what must match)."""
    positions = jnp.arange(rows.shape[1])[None, :]  # [1, T]
    is_eos = (rows == EOS) & (positions >= PROMPT)
    first_eos = jnp.argmax(is_eos, axis=1)  # [N]
    return (positions >= PROMPT) & (positions <= first_eos[:, None])


def exact_match(rows: jax.Array, decode: Decode) -> jax.Array:
    """Per-row correctness [N] bool: the decoded answer equals the reference answer + EOS exactly.

    `decode` completes prompts (BOS .. "=") into rows; for a model use `greedy_decoder`, for tests
    any function (an oracle).
    """
    out = decode(rows[:, :PROMPT])
    return jnp.all(jnp.where(answer_mask(rows), out == rows, True), axis=1)


def greedy_decoder(sampler: Callable, params) -> Decode:
    """Decode with a sampler built by `make_sampler(graphdef, length=T, temperature=0,
    eos_id=EOS, stop_at_eos=True)`; greedy decoding ignores the key, so any fixed key will do."""
    return lambda prompts: sampler(params, prompts, jax.random.key(0))


def eval_sets(tasks: tuple[str, ...], problems: int, *, key: jax.Array) -> jax.Array:
    """Fixed evaluation problems [len(tasks), problems, T], one key per task name position."""
    return jnp.stack([make_rows(t, problems, key=jax.random.fold_in(key, i)) for i, t in enumerate(tasks)])


def accuracies(sets: jax.Array, decode: Decode) -> np.ndarray:
    """Exact-match accuracy [n_tasks] of `decode` on eval sets [n_tasks, N, T] (one decode call)."""
    n, N, _ = sets.shape
    correct = exact_match(sets.reshape(n * N, T), decode)
    return np.asarray(jax.device_get(correct)).reshape(n, N).mean(axis=1)


# ---- continual-learning metrics (pure; acc[i, j] = accuracy on task j after training task i) ---


def accuracy_matrix(df: pd.DataFrame, tasks: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Task x time matrix from tidy metrics rows (columns `stage`, `step`, `acc_<task>`): row i is
    the last evaluation of stage i (after training task i), column j the accuracy on task j."""
    last = df.sort_values("step").groupby("stage").tail(1).set_index("stage").sort_index()
    matrix = last[[f"acc_{t}" for t in tasks]].to_numpy(dtype=float)
    return pd.DataFrame(
        matrix,
        index=pd.Index([tasks[i] for i in last.index], name="after"),
        columns=pd.Index(list(tasks), name="task"),
    )


def average_accuracy(acc) -> float:
    """Mean accuracy over all tasks after the last task."""
    return float(np.mean(np.asarray(acc, float)[-1]))


def backward_transfer(acc) -> float:
    """BWT = mean over j < n-1 of acc[n-1, j] - acc[j, j] (negative = forgetting)."""
    acc = np.asarray(acc, float)
    n = acc.shape[0]
    return float(np.mean([acc[n - 1, j] - acc[j, j] for j in range(n - 1)])) if n > 1 else 0.0


def forgetting(acc) -> np.ndarray:
    """Per task j < n-1: max over i < n-1 of acc[i, j] minus acc[n-1, j] (Chaudhry et al. 2018)."""
    acc = np.asarray(acc, float)
    n = acc.shape[0]
    return np.array([acc[: n - 1, j].max() - acc[n - 1, j] for j in range(n - 1)])
