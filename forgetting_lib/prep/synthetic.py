"""`synthetic:` corpora: two related generated languages with unlimited fresh text and a known
entropy rate, for capacity and tokens-per-parameter studies where a real corpus would repeat.

A language is a first-order Markov chain over a lexicon of W made-up words plus an end-of-
document state: from each word, the next word is one of `branch` successors (probabilities drawn
from a Dirichlet(`alpha`)) or, with probability 1/`doc_words`, the document ends; a document
starts from the end state's own successors. The `old` and `new` languages share the lexicon; for
every state the new language keeps a fraction `shared` of the old one's successors (with fresh
probabilities) and draws the rest anew, so the two are related the way two natural languages
share a vocabulary but not a grammar. A model that tells them apart must read the row's
dataset-id token; a model with little capacity must share its parameters between them.

Spec: `synthetic:<old|new>[?seed=0&words=128&branch=8&shared=0.5&alpha=1&doc_words=64&tokens=0]`.
`seed` and the shape keys define the language pair (the same keys give the same languages);
`tokens` is how many words the stream yields before it ends (0, the default: it never ends, so
give `binarize` a token limit). The text is the words separated by spaces (each word preceded by
one, so a tokenizer that learns the lexicon encodes one word as one token).
`iter_documents(..., seed=s)` draws stream `s` of the language: streams are independent.

Known entropy: the chain's entropy rate H = sum_s pi(s) H(P(s, .)) nats per word (EOS counted as
a word) is exact. A tokenizer maps text to tokens one-to-one, so the token stream carries
H x words / tokens nats per token; a model with unlimited capacity and context reaches that, save
for position 1 of a row, predicted from the dataset-id token alone (the marginal entropy H(pi)):
`loss_floor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator
from urllib.parse import parse_qsl

import numpy as np

LANGUAGES = ("old", "new")
DEFAULTS = {
    "seed": 0,
    "words": 128,
    "branch": 8,
    "shared": 0.5,
    "alpha": 1.0,
    "doc_words": 64,
    "tokens": 0,
}
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_CHAINS, _BLOCK = 64, 1024  # documents drawn side by side, steps per draw (vectorised)


class SyntheticSpecError(ValueError):
    """A `synthetic:` spec is malformed; the message names the key and the valid values."""


@dataclass(frozen=True)
class Language:
    """One language of a pair. States 0..W-1 are words, state W ends a document."""

    name: str  # old | new
    lexicon: tuple[str, ...]  # [W] the words
    transitions: np.ndarray  # [W + 1, W + 1] row-stochastic; row W = document start

    @property
    def eos(self) -> int:
        return len(self.lexicon)


@dataclass(frozen=True)
class Entropy:
    """The chain's entropies in nats per word (the end of a document counted as a word)."""

    rate: float  # H(next | previous), the chain's entropy rate
    marginal: float  # H(pi): one word with no context (a row's position 1)
    words_per_document: float  # mean words per document, the end excluded


def parse_spec(spec: str) -> tuple[str, dict]:
    """`synthetic:<lang>?k=v&...` -> (lang, options with defaults filled in and typed)."""
    body, _, query = spec.removeprefix("synthetic:").partition("?")
    if body not in LANGUAGES:
        raise SyntheticSpecError(
            f"corpus spec {spec!r}: the language must be one of {', '.join(LANGUAGES)} "
            "(e.g. synthetic:old?words=128, synthetic:new?words=128)"
        )
    options = dict(DEFAULTS)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in DEFAULTS:
            raise SyntheticSpecError(
                f"corpus spec {spec!r}: unknown option {key!r}; valid: {', '.join(DEFAULTS)}"
            )
        try:
            number = float(value)
        except ValueError:
            raise SyntheticSpecError(f"corpus spec {spec!r}: {key}={value!r} is not a number") from None
        if isinstance(DEFAULTS[key], int) and not number.is_integer():
            raise SyntheticSpecError(f"corpus spec {spec!r}: {key} must be a whole number, got {value}")
        options[key] = type(DEFAULTS[key])(number)
    _check(spec, options)
    return body, options


def _check(spec: str, o: dict) -> None:
    problems = []
    if not 2 <= o["words"] <= 4000:
        problems.append("words must be in [2, 4000]")
    if not 1 <= o["branch"] <= o["words"]:
        problems.append("branch must be in [1, words]")
    if not 0.0 <= o["shared"] <= 1.0:
        problems.append("shared must be in [0, 1]")
    elif o["branch"] - round(o["shared"] * o["branch"]) > o["words"] - o["branch"]:
        problems.append(
            "the new language needs branch x (1 - shared) successors outside the old ones: raise words"
        )
    if not o["seed"] >= 0:
        problems.append("seed must be >= 0")
    if not o["alpha"] > 0:
        problems.append("alpha must be > 0")
    if not o["doc_words"] >= 1:
        problems.append("doc_words must be >= 1")
    if not o["tokens"] >= 0:
        problems.append("tokens must be >= 0 (0: no end)")
    if problems:
        raise SyntheticSpecError(f"corpus spec {spec!r}: {'; '.join(problems)}")


def language(spec: str) -> Language:
    """The language a spec names (built once per distinct spec shape)."""
    lang, options = parse_spec(spec)
    shape = tuple(sorted((k, v) for k, v in options.items() if k != "tokens"))
    return _build(lang, shape)


@lru_cache(maxsize=16)
def _build(lang: str, shape: tuple) -> Language:
    o = dict(shape)
    rng = np.random.default_rng([o["seed"], 0x5EED])
    words, branch, n = o["words"], o["branch"], o["words"] + 1
    lexicon = _lexicon(words, rng)
    old = np.stack([rng.choice(words, branch, replace=False) for _ in range(n)])  # [W + 1, branch]
    successors = old
    if lang == "new":
        keep = round(o["shared"] * branch)
        successors = np.empty_like(old)
        for s in range(n):
            kept = rng.choice(old[s], keep, replace=False)
            fresh = rng.choice(np.setdiff1d(np.arange(words), old[s]), branch - keep, replace=False)
            successors[s] = np.concatenate([kept, fresh])
    weights_rng = np.random.default_rng([o["seed"], 0x5EED, LANGUAGES.index(lang)])
    probs = weights_rng.dirichlet(np.full(branch, o["alpha"]), size=n)  # [W + 1, branch]
    transitions = np.zeros((n, n))
    end = 1.0 / o["doc_words"]
    for s in range(n):
        transitions[s, successors[s]] = probs[s] * (1.0 if s == words else 1.0 - end)
    transitions[:words, words] = end
    return Language(lang, lexicon, transitions)


def _lexicon(words: int, rng: np.random.Generator) -> tuple[str, ...]:
    """`words` distinct made-up words of 1-3 consonant-vowel syllables, shortest first."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    out: list[str] = []
    seen: set[str] = set()
    for length in (1, 2, 3):
        pool = [""]
        for _ in range(length):
            pool = [p + s for p in pool for s in syllables]
        for i in rng.permutation(len(pool)):
            if len(out) == words:
                return tuple(out)
            if pool[i] not in seen:
                seen.add(pool[i])
                out.append(pool[i])
    return tuple(out)


def stationary(transitions: np.ndarray) -> np.ndarray:
    """The stationary distribution pi of a row-stochastic matrix ([S] float64, sums to 1)."""
    n = len(transitions)
    a = np.vstack([transitions.T - np.eye(n), np.ones((1, n))])
    b = np.concatenate([np.zeros(n), [1.0]])
    pi = np.clip(np.linalg.lstsq(a, b, rcond=None)[0], 0.0, None)
    return pi / pi.sum()


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of p (0 log 0 = 0)."""
    safe = np.where(p > 0, p, 1.0)
    return -(p * np.log(safe)).sum(axis=-1)


def entropy(spec: str) -> Entropy:
    """The exact entropies of the language `spec` names."""
    lang = language(spec)
    pi = stationary(lang.transitions)
    return Entropy(
        rate=float(pi @ _entropy(lang.transitions)),
        marginal=float(_entropy(pi)),
        words_per_document=float(pi[: lang.eos].sum() / pi[lang.eos]),
    )


def loss_floor(spec: str, T: int, tokens_per_word: float = 1.0) -> float:
    """The lowest reachable mean next-token loss (nats/token over a row's T - 1 predictions) on
    rows of T tokens of this language, whose token file holds `tokens_per_word` tokens per word
    (EOS counted as a word; 1 when every word is one token): position 1 costs the marginal
    entropy, positions 2..T-1 the entropy rate, both shared among a word's tokens."""
    h = entropy(spec)
    if abs(tokens_per_word - 1.0) < 0.01:  # one token per word
        return (h.marginal + (T - 2) * h.rate) / (T - 1)
    return h.rate / tokens_per_word  # a word split in several tokens: the rate dominates


def iter_documents(spec: str, *, seed: int = 0) -> Iterator[str]:
    """The documents of stream `seed` of the language, until `tokens` words are out (EOS
    included). Documents are drawn side by side in chains of `_BLOCK` steps each."""
    lang_name, options = parse_spec(spec)
    lang = language(spec)
    rng = np.random.default_rng([options["seed"], LANGUAGES.index(lang_name), seed, 0xD0C])
    successors = np.argsort(-lang.transitions, axis=1, kind="stable")  # [S, S] likeliest first
    k = int((lang.transitions > 0).sum(axis=1).max())
    successors = successors[:, :k]  # [S, k]
    cdf = np.cumsum(np.take_along_axis(lang.transitions, successors, axis=1), axis=1)  # [S, k]
    cdf[:, -1] = 1.0
    words = np.array(lang.lexicon)
    remaining = options["tokens"] or math.inf
    state = np.full(_CHAINS, lang.eos)  # every chain starts a document
    pending: list[np.ndarray] = [np.zeros(0, np.int64)] * _CHAINS  # each chain's open document
    while True:
        block = np.empty((_BLOCK, _CHAINS), np.int64)  # [steps, chains]
        for t, u in enumerate(rng.random((_BLOCK, _CHAINS))):
            state = successors[state, np.minimum((cdf[state] < u[:, None]).sum(axis=1), k - 1)]
            block[t] = state
        for c in range(_CHAINS):
            stream = np.concatenate([pending[c], block[:, c]])
            ends = np.flatnonzero(stream == lang.eos)
            for doc in np.split(stream, ends)[:-1]:  # each piece but the last ends at an EOS
                doc = doc[doc != lang.eos]
                doc = doc[: max(remaining - 1, 1)] if remaining < math.inf else doc
                if len(doc) == 0:
                    continue
                remaining -= len(doc) + 1
                yield "".join(" " + w for w in words[doc])
                if remaining <= 0:
                    return
            pending[c] = stream[ends[-1] + 1 :] if len(ends) else stream


def unbounded(spec: str) -> bool:
    """Whether corpus `spec` is a synthetic stream without an end (`tokens=0`)."""
    return spec.startswith("synthetic:") and parse_spec(spec)[1]["tokens"] == 0
