"""How close replay rows are to the old distribution: sample diagnostics of self-generated replay.

Rows are token rows [n, T] as the engine replays them (position 0 = the dataset-id token, never
counted). The statistics are pure numpy functions; `diagnose` compares a batch of replay rows
with real rows of the old distribution, and `run_diagnostics` does so for a finetuning run's
stored replay rows (`replay_rows.npy`, written by train.py) against its parent's validation rows.

Every count-based statistic depends on how many rows it sees, so `diagnose` compares equal
numbers of rows and reports each divergence beside its *floor*: the same divergence between two
disjoint halves of real rows (what sampling noise alone gives). Divergences are in bits.

- parent loss: the frozen parent's mean next-token loss (nats/token) on the rows; at temperature
  1 its loss on its own samples estimates its entropy, which equals its loss on real rows only for
  a calibrated model.
- unigram / bigram Jensen-Shannon divergence to real rows (bigrams: the 1024 most frequent keep
  their own bin, the rest share one).
- distinct-n: distinct n-grams / n-grams; duplicate rows: fraction of rows equal to an earlier one
  (replayed rows reused across steps show up here).
- EOS rate per token, and the lengths of the documents that lie wholly inside a row.
- id-conditioning: the fraction of rows that a classifier trained on the old and the new corpus
  assigns to the old one: the likelihood ratio of a token-bigram model of each (over tokens, the
  model's own units, so nothing is decoded); its accuracy on held-out real rows of both is
  reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import config as config_lib, runs
from . import data as data_lib, model as model_lib
from .assemble import auto_eval_rows
from .evaluate import make_evaluator
from .finetune import load_run


def text_tokens(rows: np.ndarray) -> np.ndarray:
    """The tokens after the id token: [n, T] -> [n, T-1]."""
    return np.asarray(rows)[:, 1:]


def unigram_counts(rows: np.ndarray, vocab_size: int) -> np.ndarray:
    """Token counts [V] over positions 1.. of every row."""
    return np.bincount(text_tokens(rows).ravel(), minlength=vocab_size).astype(np.float64)


def ngram_ids(rows: np.ndarray, n: int, base: int | None = None) -> np.ndarray:
    """One integer per n-gram inside each row (positions 1..), [rows * (T - n)] int64: the n
    tokens as digits in `base` (default: the rows' largest token + 1; ids of two row sets are
    comparable only with one base). Exact for n * log2(base) <= 63 (n <= 5 for a 4K vocabulary)."""
    tokens = text_tokens(rows).astype(np.int64)
    width = tokens.shape[1] - n + 1
    if width <= 0:
        return np.zeros(0, np.int64)
    base = int(tokens.max(initial=0)) + 1 if base is None else base
    ids = np.zeros((tokens.shape[0], width), np.int64)
    for k in range(n):
        ids = ids * base + tokens[:, k : k + width]
    return ids.ravel()


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0..1) between two count or probability vectors."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def ngram_js(a: np.ndarray, b: np.ndarray, n: int, top: int | None = 1024) -> float:
    """JS divergence (bits) between the n-gram distributions of row sets a and b.

    With `top`, only the `top` most frequent n-grams of a and b together keep their own bin and
    the rest share one: a few hundred rows see most bigrams of a 4K vocabulary at most once, so
    the full-resolution divergence of two samples of one distribution is ~1 bit, all noise.
    """
    base = int(max(text_tokens(a).max(initial=0), text_tokens(b).max(initial=0))) + 1  # one base for both
    ids_a, ids_b = ngram_ids(a, n, base), ngram_ids(b, n, base)
    keys, inverse = np.unique(np.concatenate([ids_a, ids_b]), return_inverse=True)
    if top is not None and len(keys) > top:
        kept = np.argsort(-np.bincount(inverse), kind="stable")[:top]
        bins = np.full(len(keys), top)
        bins[kept] = np.arange(top)
        inverse = bins[inverse]
    width = int(inverse.max(initial=0)) + 1
    counts_a = np.bincount(inverse[: len(ids_a)], minlength=width)
    counts_b = np.bincount(inverse[len(ids_a) :], minlength=width)
    return js_divergence(counts_a, counts_b)


def distinct_n(rows: np.ndarray, n: int) -> float:
    """Distinct n-grams / n-grams within rows (positions 1..); 1 = no n-gram repeats."""
    ids = ngram_ids(rows, n)
    return float(len(np.unique(ids)) / len(ids)) if len(ids) else float("nan")


def duplicate_rows(rows: np.ndarray) -> float:
    """Fraction of rows identical to an earlier row (0 = all distinct)."""
    rows = np.asarray(rows)
    return float(1 - len(np.unique(rows, axis=0)) / len(rows)) if len(rows) else float("nan")


def eos_rate(rows: np.ndarray, eos_id: int) -> float:
    """EOS tokens per token (positions 1..)."""
    tokens = text_tokens(rows)
    return float(np.mean(tokens == eos_id)) if tokens.size else float("nan")


def document_lengths(rows: np.ndarray, eos_id: int) -> np.ndarray:
    """Lengths in tokens (closing EOS included) of the documents lying wholly inside a row: from
    one EOS to the next. Documents cut by a row's edges are not counted, so documents much longer
    than a row are rarely seen; 1 / eos_rate estimates the mean length then."""
    out = []
    for row in text_tokens(rows):
        ends = np.flatnonzero(row == eos_id)
        out.append(np.diff(ends))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


@dataclass(frozen=True)
class IdClassifier:
    """Is a row from the old or the new corpus? The likelihood ratio of two token-bigram language
    models, one per corpus, add-alpha smoothed (naive Bayes over a row's bigrams, each conditioned
    on its first token): unigram counts alone cannot tell apart corpora that use the same tokens
    equally often in different orders."""

    vocab_size: int
    keys: np.ndarray  # [K] sorted bigram ids a * V + b seen in either corpus
    log_pair: np.ndarray  # [2, K + 1]: log(count(a, b) + alpha) per corpus; column K = unseen
    log_context: np.ndarray  # [2, V]: log(count(a, .) + alpha V) per corpus

    def old_score(self, rows: np.ndarray) -> np.ndarray:
        """log p(row | old) - log p(row | new) over its bigrams, [n] (> 0: looks like old)."""
        tokens = text_tokens(rows).astype(np.int64)
        first, ids = tokens[:, :-1], tokens[:, :-1] * self.vocab_size + tokens[:, 1:]  # [n, T-2]
        pos = np.minimum(np.searchsorted(self.keys, ids), max(len(self.keys) - 1, 0))
        col = np.where(self.keys[pos] == ids, pos, len(self.keys)) if len(self.keys) else np.zeros_like(ids)
        pair = self.log_pair[0] - self.log_pair[1]
        context = self.log_context[0] - self.log_context[1]
        return (pair[col] - context[first]).sum(axis=1)

    def old_fraction(self, rows: np.ndarray) -> float:
        """Fraction of rows assigned to the old corpus (equal priors)."""
        return float(np.mean(self.old_score(rows) > 0)) if len(rows) else float("nan")


def fit_id_classifier(old: np.ndarray, new: np.ndarray, vocab_size: int, alpha: float = 1.0) -> IdClassifier:
    """The two bigram models from rows of the old and the new corpus (add-`alpha` smoothing)."""
    pairs = []
    for r in (old, new):
        tokens = text_tokens(r).astype(np.int64)
        pairs.append((tokens[:, :-1].ravel(), (tokens[:, :-1] * vocab_size + tokens[:, 1:]).ravel()))
    keys = np.unique(np.concatenate([ids for _, ids in pairs]))
    counts = np.stack([np.bincount(np.searchsorted(keys, ids), minlength=len(keys)) for _, ids in pairs])
    context = np.stack([np.bincount(first, minlength=vocab_size) for first, _ in pairs])
    log_pair = np.log(np.concatenate([counts + alpha, np.full((2, 1), alpha)], axis=1))
    return IdClassifier(vocab_size, keys, log_pair, np.log(context + alpha * vocab_size))


def make_loss(graphdef: Any, params: Any, batch_rows: int | None = None) -> Callable[[np.ndarray], float]:
    """loss(rows [n, T]) -> the model's mean next-token loss (nats/token) over every position of
    every row: the run's own evaluator, in batches of `batch_rows` rows (default: evaluation's)."""
    evaluate = make_evaluator(model_lib.make_hidden(graphdef))

    def loss(rows: np.ndarray) -> float:
        rows = np.asarray(rows, np.int32)
        tokens, mask = data_lib.batched(rows, batch_rows or auto_eval_rows(rows.shape[1]))
        return float(evaluate(params, None, tokens, mask)["ntp"])

    return loss


def diagnose(
    replay: np.ndarray,
    real: np.ndarray,
    *,
    vocab_size: int,
    eos_id: int,
    classifier: IdClassifier | None = None,
    loss: Callable[[np.ndarray], float] | None = None,
) -> dict[str, float]:
    """Diagnostics of replay rows [n, T] against real old-distribution rows [m, T].

    Count-based statistics use n' = min(n, m) rows of each; given m >= 2 n' real rows, each
    divergence's `*_floor` is the same divergence between real rows [0:n'] and [n':2n'] (NaN
    otherwise). `classifier` adds id-conditioning, `loss` (a `make_loss` of the parent) the
    parent's loss on both.
    """
    n = min(len(replay), len(real))
    if n == 0:
        raise ValueError(f"diagnose needs rows: got {len(replay)} replay rows and {len(real)} real rows")
    ours, theirs = np.asarray(replay)[:n], np.asarray(real)[:n]
    other = np.asarray(real)[n : 2 * n] if len(real) >= 2 * n else None

    def floor(fn: Callable[[np.ndarray, np.ndarray], float]) -> float:
        return fn(theirs, other) if other is not None else float("nan")

    unigram = lambda a, b: js_divergence(unigram_counts(a, vocab_size), unigram_counts(b, vocab_size))  # noqa: E731
    bigram = lambda a, b: ngram_js(a, b, 2)  # noqa: E731
    docs, real_docs = document_lengths(ours, eos_id), document_lengths(theirs, eos_id)
    out = {
        "rows": float(n),
        "unigram_js": unigram(ours, theirs),
        "unigram_js_floor": floor(unigram),
        "bigram_js": bigram(ours, theirs),
        "bigram_js_floor": floor(bigram),
        "distinct_1": distinct_n(ours, 1),
        "distinct_2": distinct_n(ours, 2),
        "distinct_4": distinct_n(ours, 4),
        "distinct_2_real": distinct_n(theirs, 2),
        "duplicate_rows": duplicate_rows(ours),
        "eos_rate": eos_rate(ours, eos_id),
        "eos_rate_real": eos_rate(theirs, eos_id),
        "doc_tokens_mean": float(docs.mean()) if len(docs) else float("nan"),
        "doc_tokens_mean_real": float(real_docs.mean()) if len(real_docs) else float("nan"),
    }
    if classifier is not None:
        out["id_old_fraction"] = classifier.old_fraction(ours)
        out["id_old_fraction_real"] = classifier.old_fraction(theirs)
    if loss is not None:
        out["parent_loss"] = loss(ours)
        out["parent_loss_real"] = loss(theirs)
        out["parent_loss_gap"] = out["parent_loss"] - out["parent_loss_real"]
    return out


@dataclass(frozen=True)
class OldReference:
    """What a run's replay rows are compared with, shared by every finetune of one parent on one
    new dataset: real old rows, the parent's loss (and its value on its validation rows), the id
    classifier."""

    real: np.ndarray  # [m, T] real old rows: the parent's validation rows (shuffled), then random train rows
    vocab_size: int
    eos_id: int
    classifier: IdClassifier
    classifier_accuracy: float  # on the validation rows of both corpora
    loss: Callable[[np.ndarray], float]  # the parent's mean next-token loss
    held_loss: float  # the parent's loss on its validation rows


def old_reference(
    cfg: config_lib.Config, *, real_rows: int = 512, classifier_rows: int = 2048
) -> OldReference:
    """The reference of a (resolved) finetuning config: `real_rows` real old rows (the parent's
    validation rows in random order, then random train rows); the classifier trained on
    `classifier_rows` other random train rows of each of the parent's data (old) and the run's
    data (new), equally many, at most half the old ones; the parent's loss function."""
    p, d, V = cfg.parent, cfg.data, cfg.model.V
    old = data_lib.open_rows(
        p.data_path, T=p.T, valid_tokens=p.valid_tokens, split_seed=p.split_seed, vocab_size=V
    )
    new = data_lib.open_rows(
        d.path, T=d.T, valid_tokens=d.valid_tokens, split_seed=d.split_seed, vocab_size=V
    )
    # Random train rows (token files keep their corpus's order: a prefix would be one topic):
    # the first ones fit the classifier, the old corpus's others stand in as more real rows.
    old_train, new_train = (np.random.default_rng(0).permutation(r.train_rows) for r in (old, new))
    # equal rows of both (add-alpha smoothing favours the smaller corpus for unseen bigrams),
    # leaving half the old train rows to compare with
    fit_rows = min(classifier_rows, len(old_train) // 2, len(new_train))
    classifier = fit_id_classifier(old.rows(old_train[:fit_rows]), new.rows(new_train[:fit_rows]), V)
    held_old, held_new = old.rows(old.valid_rows), new.rows(new.valid_rows)
    accuracy = 0.5 * (classifier.old_fraction(held_old) + 1 - classifier.old_fraction(held_new))
    held_shuffled = held_old[np.random.default_rng(1).permutation(len(held_old))]  # sorted rows: one topic
    extra = old_train[fit_rows:][: max(real_rows - len(held_old), 0)]
    _, graphdef, params = load_run(cfg.model.load_path)
    loss = make_loss(graphdef, params)
    return OldReference(
        real=np.concatenate([held_shuffled, old.rows(np.sort(extra))])[:real_rows],
        vocab_size=V,
        eos_id=int(old.sidecar["eos_id"]),
        classifier=classifier,
        classifier_accuracy=accuracy,
        loss=loss,
        held_loss=loss(held_old),
    )


def run_diagnostics(
    run_dir: str | Path,
    references: dict[tuple[str, str], OldReference] | None = None,
    rows: int | None = None,
) -> dict[str, Any]:
    """`diagnose` of a finetuning run's stored replay rows (the first `rows` of them: compare
    runs at one row count, as every count-based statistic depends on it) against its config's
    `old_reference`. `references` is a cache the caller keeps, (parent, new data) -> reference,
    so that the many runs of one parent build theirs once. `parent_loss_real` is the parent's
    loss on its validation rows; `id_classifier_accuracy` the classifier's accuracy on held-out
    rows of both corpora."""
    run_dir = Path(run_dir)
    replay = runs.read_replay_rows(run_dir)
    if replay is None:
        raise FileNotFoundError(
            f"{run_dir} holds no {runs.REPLAY_ROWS}: only a finetune that replays rows (a replay "
            f"method, reg.method=ntp_pre/kl_pre/replace) keeps them; a run from before runs kept "
            f"them can be rerun with --overwrite"
        )
    replay = replay[:rows]
    cfg = config_lib.from_dict(runs.read_config(run_dir))
    references = {} if references is None else references
    key = (cfg.model.load_path, cfg.data.path)
    if key not in references:
        references[key] = old_reference(cfg)
    ref = references[key]
    out = diagnose(replay, ref.real, vocab_size=ref.vocab_size, eos_id=ref.eos_id, classifier=ref.classifier)
    out["parent_loss"] = ref.loss(replay[: int(out["rows"])])
    out["parent_loss_real"] = ref.held_loss
    out["parent_loss_gap"] = out["parent_loss"] - ref.held_loss
    return {**out, "id_classifier_accuracy": ref.classifier_accuracy}
