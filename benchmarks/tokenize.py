"""Benchmark: tokenizer training and binarization speed on the built-in bilingual sample.

Trains (or reuses) a tokenizer under outputs/bench/tok on sample:en + sample:es, binarizes the
whole of each sample into outputs/bench/, and prints documents, tokens, seconds, tokens/s and
characters per token. Target: the whole English sample in under 60 s on 2 CPU cores.

Run from the repository root: `python -m benchmarks.tokenize` (or `python benchmarks/tokenize.py`).
"""

from __future__ import annotations

import os
import sys

# This file's name shadows the standard library's `tokenize` (which inspect, dataclasses and
# linecache import) when run as `python benchmarks/tokenize.py`: Python puts benchmarks/ first
# on sys.path. Drop that entry before anything imports `tokenize`.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import time  # noqa: E402
from pathlib import Path  # noqa: E402

from forgetting_lib.prep.binarize import binarize  # noqa: E402
from forgetting_lib.prep.corpora import iter_documents  # noqa: E402
from forgetting_lib.prep.tokenizer import Tokenizer, TokenizerError, train_tokenizer  # noqa: E402

OUT = Path("outputs/bench")
CORPORA = ("sample:en", "sample:es")


def get_tokenizer() -> tuple[Tokenizer, float | None]:
    """Reuse outputs/bench/tok when it is a valid tokenizer of CORPORA, else train it."""
    try:
        tok = Tokenizer.load(OUT / "tok")
        if tuple(tok.card["corpora"]) == CORPORA:
            return tok, None
    except TokenizerError:
        pass
    start = time.perf_counter()
    tok = train_tokenizer(list(CORPORA), OUT / "tok")
    return tok, time.perf_counter() - start


def main() -> None:
    """Time binarizing each whole sample language and print the table."""
    os.environ.setdefault("FORGETTING_PLAIN_PROGRESS", "1")
    for spec in CORPORA:  # download/extract outside the timed region
        sum(1 for _ in iter_documents(spec))
    tok, train_s = get_tokenizer()
    print(
        f"tokenizer: {'reused' if train_s is None else f'trained in {train_s:.1f} s'}, "
        f"vocab {tok.vocab_size}, {os.cpu_count()} CPU cores"
    )
    rows = []
    for dataset_id, spec in enumerate(CORPORA):
        chars = sum(len(doc) for doc in iter_documents(spec))
        start = time.perf_counter()
        meta = binarize(spec, tok, OUT / f"{spec.split(':')[1]}.bin", dataset_id=dataset_id)
        seconds = time.perf_counter() - start
        rows.append(
            (
                spec,
                meta["num_documents"],
                meta["num_tokens"],
                seconds,
                meta["num_tokens"] / seconds,
                chars / meta["num_tokens"],
            )
        )
    header = ("corpus", "documents", "tokens", "seconds", "tokens/s", "chars/token")
    print(f"{header[0]:<10} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (9, 10, 8, 11, 11))))
    for spec, docs, tokens, seconds, rate, cpt in rows:
        print(f"{spec:<10} {docs:>9,} {tokens:>10,} {seconds:>8.2f} {rate:>11,.0f} {cpt:>11.2f}")


if __name__ == "__main__":
    main()
