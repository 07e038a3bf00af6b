"""Binarize: stream a corpus through a tokenizer into one flat token file plus a sidecar.

File format (`name.bin` + `name.json`): the .bin is raw little-endian token ids, no header, every
document followed by EOS (the last one may be cut by `max_tokens`); ids are uint16 when the
tokenizer's fit (vocab_size <= 65,536: our SentencePiece tokenizers) and uint32 otherwise (a
pretrained model's, e.g. Llama 3's 128K), and the sidecar's `dtype` says which. The sidecar also
holds the dataset id, source corpus, token count and tokenizer fingerprint; the dataset-id token
(a Hugging Face tokenizer's BOS) is not written into the stream (data loading places it). Both
files are written under temporary names and renamed, the .bin first and the sidecar last, so a
.bin without a sidecar (or whose size disagrees with it) is an interrupted run: `read_token_file`
rejects it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from itertools import chain, islice
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from .. import locks
from ..fileio import is_no_space, no_space_message, remove_temporaries
from ..progress import Progress
from . import synthetic
from .corpora import iter_documents
from .hf_tokenizer import HFTokenizer
from .tokenizer import Tokenizer, load_tokenizer

FORMAT = "forgetting-tokens-v1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # sidecar dtype -> file layout


def token_dtype(vocab_size: int) -> str:
    """The sidecar dtype of a token file for a tokenizer of `vocab_size` ids: the smallest that fits."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenFileError(ValueError):
    """A token file is missing, incomplete, or was made with another tokenizer."""


def sidecar_path(path: str | Path) -> Path:
    """The sidecar of token file `name.bin`: `name.json` beside it."""
    return Path(path).with_suffix(".json")


def binarize(
    corpus: str,
    tokenizer: Tokenizer | HFTokenizer | str | Path,
    out_path: str | Path,
    *,
    dataset_id: int,
    max_tokens: int | None = None,
    shuffle_documents: bool = False,
    seed: int = 0,
    batch_documents: int = 256,
) -> dict:
    """Tokenize every document of `corpus` (EOS after each) into `out_path` (a `.bin`), stopping
    at `max_tokens`; returns the sidecar dict, also written to `sidecar_path(out_path)`.

    `shuffle_documents` reads the whole corpus into memory and permutes it with
    `numpy.random.default_rng(seed)`: fine for the built-in sample and local files; for large
    streaming `hf:` corpora leave it off and rely on the stream's own shuffle buffer.
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    out_path = Path(out_path)
    _check_arguments(corpus, tok, out_path, dataset_id, max_tokens, batch_documents)
    dtype = token_dtype(tok.vocab_size)
    docs: Iterable[str] = iter_documents(corpus, seed=seed)
    if shuffle_documents:
        docs = list(docs)
        docs = [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with locks.hold(out_path.with_name(f".{out_path.name}.lock"), f"token file {out_path}"):
        # holding the lock, any temporary of this file is a killed binarize's leftover
        remove_temporaries(
            out_path.parent, [f"{out_path.name}.tmp-*", f"{sidecar_path(out_path).name}.tmp-*"]
        )
        tmp_bin = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
        tmp_json = out_path.with_name(f"{sidecar_path(out_path).name}.tmp-{os.getpid()}")
        try:
            with open(tmp_bin, "wb") as f, Progress(f"binarize {corpus}", max_tokens, "tok") as progress:
                num_tokens, num_docs = _write_tokens(
                    docs, tok, f, DTYPES[dtype], max_tokens, batch_documents, progress
                )
            if num_docs == 0:
                raise TokenFileError(
                    f"corpus {corpus!r} yielded no documents; nothing to binarize "
                    "(check the spec: empty files? wrong split?)"
                )
            sidecar = {
                "format": FORMAT,
                "dtype": dtype,
                "num_tokens": num_tokens,
                "num_documents": num_docs,
                "dataset_id": dataset_id,
                "dataset_token": tok.dataset_token(dataset_id),
                "corpus": corpus,
                "tokenizer_fingerprint": tok.fingerprint,
                "tokenizer_dir": str(tok.directory.resolve()),
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "max_tokens": max_tokens,
                "shuffle_documents": shuffle_documents,
                "seed": seed,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            tmp_json.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
            sidecar_path(out_path).unlink(missing_ok=True)  # from here the old pair is invalid
            os.replace(tmp_bin, out_path)
            os.replace(tmp_json, sidecar_path(out_path))
        except OSError as err:
            if is_no_space(err):
                raise TokenFileError(
                    f"cannot write {out_path}: {no_space_message(out_path.parent)}"
                ) from None
            raise
        finally:
            tmp_bin.unlink(missing_ok=True)
            tmp_json.unlink(missing_ok=True)
    return sidecar


def _check_arguments(
    corpus: str,
    tok: Tokenizer | HFTokenizer,
    out_path: Path,
    dataset_id: int,
    max_tokens: int | None,
    batch_documents: int,
) -> None:
    """Fail before any work on arguments that cannot produce a valid token file."""
    if max_tokens is None and synthetic.unbounded(corpus):
        raise TokenFileError(
            f"corpus {corpus!r} never ends: give a token limit (--max-tokens N, max_tokens=N) or "
            "a length in the spec (?tokens=N)"
        )
    if out_path.suffix != ".bin":
        raise TokenFileError(f"out_path {out_path} must end in .bin (the sidecar is the .json beside it)")
    try:
        tok.dataset_token(dataset_id)  # a SentencePiece tokenizer reserves a few; an HF one takes any
    except IndexError as err:
        raise TokenFileError(f"dataset_id={dataset_id}: {err}; pick one of those") from None
    if max_tokens is not None and max_tokens <= 0:
        raise TokenFileError(f"max_tokens={max_tokens} must be positive (or None for no limit)")
    if batch_documents <= 0:
        raise TokenFileError(f"batch_documents={batch_documents} must be positive")


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def _write_tokens(
    docs: Iterable[str],
    tok: Tokenizer | HFTokenizer,
    f: BinaryIO,
    dtype: np.dtype,
    max_tokens: int | None,
    batch_documents: int,
    progress: Progress,
) -> tuple[int, int]:
    """Encode `docs` batch by batch into `f`; returns (tokens written, documents started)."""
    num_tokens = num_docs = 0
    eos = tok.eos_id
    for batch in _batches(docs, batch_documents):
        encoded = tok.encode(batch)
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(
            chain.from_iterable(ids + [eos] for ids in encoded), dtype=dtype, count=int(lengths.sum())
        )
        if max_tokens is not None and num_tokens + flat.size >= max_tokens:
            room = max_tokens - num_tokens
            starts = np.cumsum(lengths) - lengths
            num_docs += int(np.searchsorted(starts, room, side="left"))
            flat[:room].tofile(f)
            num_tokens += room
            progress.update(room, docs=num_docs)
            break
        flat.tofile(f)
        num_tokens += flat.size
        num_docs += len(encoded)
        progress.update(int(flat.size), docs=num_docs)
    return num_tokens, num_docs


def read_token_file(path: str | Path, *, expected_fingerprint: str | None = None) -> tuple[np.memmap, dict]:
    """Open a finished token file read-only: (memmap of all tokens, uint16 or uint32 as the
    sidecar's dtype says; sidecar dict).

    Rejects a missing or incomplete file (no sidecar, or size != itemsize * num_tokens) and, when
    `expected_fingerprint` is given, a file made with a different tokenizer.
    """
    path, side = Path(path), sidecar_path(path)
    if not path.exists():
        raise TokenFileError(
            f"token file {path} does not exist; create it with `python -m forgetting_lib binarize --out ...`"
        )
    if not side.exists():
        raise TokenFileError(
            f"token file {path} has no sidecar {side}: binarization did not finish; run binarize again"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenFileError(f"sidecar {side} is not valid JSON ({err}); run binarize again") from None
    if meta.get("format") != FORMAT or meta.get("dtype") not in DTYPES:
        raise TokenFileError(
            f"{side}: format {meta.get('format')!r}/{meta.get('dtype')!r}, expected "
            f"{FORMAT!r}/one of {', '.join(map(repr, DTYPES))}; run binarize again"
        )
    dtype, size = DTYPES[meta["dtype"]], path.stat().st_size
    if size != dtype.itemsize * meta["num_tokens"]:
        raise TokenFileError(
            f"token file {path} has {size} bytes but {side} says {meta['num_tokens']} tokens of "
            f"{meta['dtype']} ({dtype.itemsize * meta['num_tokens']} bytes): it is incomplete or "
            "from another run; run binarize again"
        )
    if expected_fingerprint is not None and meta["tokenizer_fingerprint"] != expected_fingerprint:
        raise TokenFileError(
            f"token file {path} was made with tokenizer {meta['tokenizer_fingerprint'][:12]}… "
            f"({meta.get('tokenizer_dir')}) but tokenizer {expected_fingerprint[:12]}… is in use; "
            "re-binarize it with the right tokenizer (python -m forgetting_lib binarize --tokenizer ...)"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(meta["num_tokens"],))
    return tokens, meta


def binarize_or_reuse(
    corpus: str,
    tokenizer: Tokenizer | HFTokenizer | str | Path,
    out_path: str | Path,
    *,
    dataset_id: int,
    max_tokens: int | None = None,
) -> dict:
    """The sidecar of `out_path` if it is a finished token file of `corpus` (same dataset id,
    token limit and tokenizer), else `binarize` it afresh (notebooks and the quickstart call this,
    so rerunning them reuses the work)."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    try:
        _, meta = read_token_file(out_path, expected_fingerprint=tok.fingerprint)
        if (meta["corpus"], meta["dataset_id"], meta["max_tokens"]) == (corpus, dataset_id, max_tokens):
            return meta
    except TokenFileError:
        pass
    return binarize(corpus, tok, out_path, dataset_id=dataset_id, max_tokens=max_tokens)


def document_lengths(path: str | Path) -> np.ndarray:
    """Tokens per document of a token file, EOS included ([num_documents] int64; a last document
    cut by `max_tokens` counts with the tokens it kept)."""
    tokens, meta = read_token_file(path)
    ends = np.flatnonzero(np.asarray(tokens) == meta["eos_id"])
    lengths = np.diff(np.concatenate([[-1], ends]))
    tail = len(tokens) - (int(ends[-1]) + 1 if len(ends) else 0)
    return np.concatenate([lengths, [tail]]) if tail else lengths
