"""Shared fixtures: the real bilingual sample, a small local `files:` corpus, and tokenizers
trained once per session on each."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import pytest

from forgetting_lib.prep.corpora import CorpusError, iter_documents
from forgetting_lib.prep.tokenizer import Tokenizer, train_tokenizer

# Implicit dtype promotion (f32 + bf16, int + float arrays) and implicit rank promotion
# ([B, T] + [T]) raise in every test: casts and broadcasts in the library are written out.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

SMALL_TEXTS = {
    "a.txt": [
        "The quick brown fox jumps over the lazy dog.\nIt was 1234 miles away.",
        "El veloz murciélago hindú comía feliz cardillo y kiwi.\nLa cigüeña tocaba el saxofón.",
        "Tabs\tand  double  spaces, trailing space \nand a line with émojis 😀 and ünïcödé.",
    ],
    "b.txt": [
        "In the beginning was the word, and the word was with the text.",
        "Numbers: 3.14159, 2,718, 42 and 007.\nPunctuation! (brackets) [square] {curly} <angle>.",
        "Ελληνικά, русский, 中文, العربية, हिन्दी: scripts beyond Latin.",
    ],
}


@pytest.fixture(scope="session")
def sample_docs() -> dict[str, list[str]]:
    """The built-in sample, one list of chapter documents per language (downloaded once into
    the user's cache; skipped only on machines without apt-get)."""
    docs = {}
    for lang in ("en", "es"):
        try:
            docs[lang] = list(iter_documents(f"sample:{lang}"))
        except CorpusError as err:
            if shutil.which("apt-get") is None:
                pytest.skip(f"built-in sample unavailable: {err}")
            raise
    return docs


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory) -> Path:
    """A folder of .txt files whose documents are SMALL_TEXTS (blank-line separated)."""
    folder = tmp_path_factory.mktemp("small_corpus")
    for name, docs in SMALL_TEXTS.items():
        (folder / name).write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def small_docs() -> list[str]:
    """The documents of `small_corpus_dir`, in the order files: yields them."""
    return [doc for name in sorted(SMALL_TEXTS) for doc in SMALL_TEXTS[name]]


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, small_corpus_dir) -> Tokenizer:
    """A 400-piece tokenizer trained on the small files: corpus (mostly byte fallback)."""
    out = tmp_path_factory.mktemp("small_tok") / "tok"
    return train_tokenizer([f"files:{small_corpus_dir}/*.txt"], out, vocab_size=400)


@pytest.fixture(scope="session")
def sample_tokenizer(tmp_path_factory, sample_docs) -> Tokenizer:
    """The default 4096-piece tokenizer on 200k characters of each sample language (~1 s)."""
    out = tmp_path_factory.mktemp("sample_tok") / "tok"
    return train_tokenizer(["sample:en", "sample:es"], out, chars_per_corpus=200_000)
