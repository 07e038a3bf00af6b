"""Binarize: sidecar contents, EOS per document, truncation, atomicity, fingerprint checks, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forgetting_lib.__main__ import main
from forgetting_lib.prep import binarize as binarize_module
from forgetting_lib.prep.binarize import TokenFileError, binarize, read_token_file, sidecar_path

SIDECAR_KEYS = {
    "format",
    "dtype",
    "num_tokens",
    "num_documents",
    "dataset_id",
    "dataset_token",
    "corpus",
    "tokenizer_fingerprint",
    "tokenizer_dir",
    "vocab_size",
    "eos_id",
    "max_tokens",
    "shuffle_documents",
    "seed",
    "created",
}


def test_sidecar_and_tokens_reproduce_every_document(small_tokenizer, small_corpus_dir, small_docs, tmp_path):
    corpus = f"files:{small_corpus_dir}/*.txt"
    meta = binarize(corpus, small_tokenizer.directory, tmp_path / "small.bin", dataset_id=3)
    tokens, read_meta = read_token_file(
        tmp_path / "small.bin", expected_fingerprint=small_tokenizer.fingerprint
    )
    assert read_meta == meta and set(meta) == SIDECAR_KEYS
    assert meta["format"] == "forgetting-tokens-v1" and meta["dtype"] == "uint16"
    assert (meta["dataset_id"], meta["dataset_token"]) == (3, small_tokenizer.dataset_token(3))
    assert meta["num_documents"] == len(small_docs) == int((tokens == small_tokenizer.eos_id).sum())
    assert tokens[-1] == small_tokenizer.eos_id and meta["num_tokens"] == tokens.size
    assert tokens.dtype == np.dtype("<u2") and not tokens.flags.writeable
    segments = np.split(np.asarray(tokens), np.flatnonzero(tokens == small_tokenizer.eos_id)[:-1] + 1)
    assert [small_tokenizer.decode(seg) for seg in segments] == small_docs


def test_sample_eos_count_equals_chapters(sample_tokenizer, tmp_path):
    meta = binarize("sample:es", sample_tokenizer, tmp_path / "es.bin", dataset_id=1)
    tokens, _ = read_token_file(tmp_path / "es.bin")
    assert meta["num_documents"] == 1189 == int((tokens == sample_tokenizer.eos_id).sum())
    assert (tmp_path / "es.bin").stat().st_size == 2 * meta["num_tokens"]


def test_max_tokens_truncates(small_tokenizer, small_corpus_dir, tmp_path):
    corpus = f"files:{small_corpus_dir}/*.txt"
    full = binarize(corpus, small_tokenizer, tmp_path / "full.bin", dataset_id=0, batch_documents=2)
    full_tokens, _ = read_token_file(tmp_path / "full.bin")
    first_doc = int(np.flatnonzero(full_tokens == small_tokenizer.eos_id)[0]) + 1
    for limit, docs in [(first_doc, 1), (first_doc + 1, 2), (full["num_tokens"] + 100, 6)]:
        meta = binarize(
            corpus, small_tokenizer, tmp_path / "cut.bin", dataset_id=0, max_tokens=limit, batch_documents=2
        )
        tokens, _ = read_token_file(tmp_path / "cut.bin")
        assert meta["num_tokens"] == tokens.size == min(limit, full["num_tokens"])
        assert meta["num_documents"] == docs and meta["max_tokens"] == limit
        np.testing.assert_array_equal(tokens, full_tokens[: tokens.size])


def test_shuffle_is_a_seeded_permutation_of_documents(small_tokenizer, small_corpus_dir, tmp_path):
    corpus = f"files:{small_corpus_dir}/*.txt"
    docs = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2), ("plain", 0)]:
        binarize(
            corpus,
            small_tokenizer,
            tmp_path / f"{name}.bin",
            dataset_id=0,
            shuffle_documents=name != "plain",
            seed=seed,
        )
        tokens, _ = read_token_file(tmp_path / f"{name}.bin")
        ends = np.flatnonzero(tokens == small_tokenizer.eos_id)
        docs[name] = [small_tokenizer.decode(s) for s in np.split(np.asarray(tokens), ends[:-1] + 1)]
    assert docs["a"] == docs["b"] != docs["c"]
    assert sorted(docs["a"]) == sorted(docs["plain"]) and docs["a"] != docs["plain"]


def _failing_corpus(spec, *, seed=0):
    for i in range(600):
        yield f"document {i}"
    raise RuntimeError("network dropped mid-stream")


def test_interrupted_binarization_leaves_nothing_readable(small_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(binarize_module, "iter_documents", _failing_corpus)
    with pytest.raises(RuntimeError, match="mid-stream"):
        binarize("files:whatever", small_tokenizer, tmp_path / "x.bin", dataset_id=0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TokenFileError, match="does not exist"):
        read_token_file(tmp_path / "x.bin")


def test_crash_between_renames_invalidates_the_old_pair(
    small_tokenizer, small_corpus_dir, tmp_path, monkeypatch
):
    corpus, out = f"files:{small_corpus_dir}/*.txt", tmp_path / "x.bin"
    binarize(corpus, small_tokenizer, out, dataset_id=0)
    real_replace, calls = binarize_module.os.replace, []

    def replace_then_die(src, dst):
        """Rename the .bin, then die before the sidecar's rename."""
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(binarize_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        binarize(corpus, small_tokenizer, out, dataset_id=1, max_tokens=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    with pytest.raises(TokenFileError, match="no sidecar.*run binarize again"):
        read_token_file(out)


def test_size_mismatch_and_fingerprint_mismatch_are_errors(small_tokenizer, small_corpus_dir, tmp_path):
    out = tmp_path / "x.bin"
    binarize(f"files:{small_corpus_dir}/*.txt", small_tokenizer, out, dataset_id=0)
    with pytest.raises(TokenFileError, match="re-binarize it with the right tokenizer") as err:
        read_token_file(out, expected_fingerprint="f" * 64)
    assert small_tokenizer.fingerprint[:12] in str(err.value) and "ffffffffffff" in str(err.value)
    with open(out, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(TokenFileError, match="incomplete.*run binarize again"):
        read_token_file(out)


def test_bad_inputs_fail_before_any_work(small_tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TokenFileError, match="empty.txt' yielded no documents"):
        binarize(f"files:{tmp_path}/empty.txt", small_tokenizer, tmp_path / "e.bin", dataset_id=0)
    with pytest.raises(TokenFileError, match="reserves dataset ids 0..9"):
        binarize("sample:en", small_tokenizer, tmp_path / "e.bin", dataset_id=10)
    with pytest.raises(TokenFileError, match=r"must end in \.bin"):
        binarize("sample:en", small_tokenizer, tmp_path / "e.json", dataset_id=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_cli_trains_binarizes_and_reports_errors_in_one_line(small_corpus_dir, tmp_path, capsys):
    corpus = f"files:{small_corpus_dir}/*.txt"
    assert main(["tokenizer", "--corpus", corpus, "--out", str(tmp_path / "tok"), "--vocab-size", "400"]) == 0
    assert (
        main(
            [
                "binarize",
                "--corpus",
                corpus,
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "d/x.bin"),
                "--dataset-id",
                "2",
                "--max-tokens",
                "50",
                "--shuffle",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    meta = json.loads(sidecar_path(tmp_path / "d/x.bin").read_text())
    assert (meta["num_tokens"], meta["dataset_id"]) == (50, 2)
    assert (meta["shuffle_documents"], meta["seed"]) == (True, 3)
    capsys.readouterr()
    assert (
        main(
            [
                "binarize",
                "--corpus",
                "nope:x",
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "y.bin"),
                "--dataset-id",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: unknown corpus spec 'nope:x'") and err.count("\n") == 1


def test_binarize_or_reuse_rebuilds_only_when_settings_change(small_tokenizer, small_corpus_dir, tmp_path):
    from forgetting_lib.prep.binarize import binarize_or_reuse

    corpus, out = f"files:{small_corpus_dir}/*.txt", tmp_path / "x.bin"
    binarize_or_reuse(corpus, small_tokenizer, out, dataset_id=1)
    mtime = out.stat().st_mtime_ns
    assert binarize_or_reuse(corpus, small_tokenizer, out, dataset_id=1)["dataset_id"] == 1
    assert out.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert binarize_or_reuse(corpus, small_tokenizer, out, dataset_id=2)["dataset_id"] == 2
    assert binarize_or_reuse(corpus, small_tokenizer, out, dataset_id=2, max_tokens=10)["num_tokens"] == 10


def test_document_lengths(small_tokenizer, small_corpus_dir, small_docs, tmp_path):
    from forgetting_lib.prep.binarize import document_lengths

    corpus = f"files:{small_corpus_dir}/*.txt"
    whole = binarize(corpus, small_tokenizer, tmp_path / "a.bin", dataset_id=0)
    lengths = document_lengths(tmp_path / "a.bin")
    assert lengths.tolist() == [len(small_tokenizer.encode_one(d)) + 1 for d in small_docs]  # + EOS
    assert lengths.sum() == whole["num_tokens"]
    binarize(corpus, small_tokenizer, tmp_path / "b.bin", dataset_id=0, max_tokens=int(lengths[0]) + 3)
    assert document_lengths(tmp_path / "b.bin").tolist() == [lengths[0], 3]  # the cut document counts


def test_sidecar_dtype_decides_the_item_size(small_tokenizer, small_corpus_dir, tmp_path):
    out = tmp_path / "x.bin"
    meta = binarize(f"files:{small_corpus_dir}/*.txt", small_tokenizer, out, dataset_id=0)
    ids = np.asarray(read_token_file(out)[0]).copy()
    ids.astype("<u4").tofile(out)  # the same ids, 4 bytes each, under a uint16 sidecar
    with pytest.raises(TokenFileError, match=r"says \d+ tokens of uint16 .*incomplete or from another run"):
        read_token_file(out)
    sidecar_path(out).write_text(json.dumps(meta | {"dtype": "uint32"}))
    tokens, _ = read_token_file(out)
    assert tokens.dtype == np.dtype("<u4") and tokens.tolist() == ids.tolist()
    sidecar_path(out).write_text(json.dumps(meta | {"dtype": "int8"}))
    with pytest.raises(TokenFileError, match="'int8', expected .*'uint16', 'uint32'"):
        read_token_file(out)


def test_token_dtype_is_the_smallest_that_fits():
    from forgetting_lib.prep.binarize import token_dtype

    assert [token_dtype(v) for v in (400, 65_536, 65_537, 128_256)] == [
        "uint16",
        "uint16",
        "uint32",
        "uint32",
    ]
