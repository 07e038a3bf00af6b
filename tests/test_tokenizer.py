"""Tokenizer: exact round trips, special ids where the card says, atomic folders, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from forgetting_lib.prep.tokenizer import CARD_FILE, MODEL_FILE, Tokenizer, TokenizerError, train_tokenizer

# Everything except lone surrogates (not valid Unicode; Python cannot UTF-8 encode them) and
# U+2581 "▁", SentencePiece's internal space, which decodes as " " (see tokenizer.py).
VALID_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"))
WHITESPACE_HEAVY = st.text(st.sampled_from(list(" \t\n\r\x00\x0b\x0c\u00a0\u3000ab1é😀")))


def test_round_trip_on_every_sample_chapter(sample_tokenizer, sample_docs):
    for lang, docs in sample_docs.items():
        encoded = sample_tokenizer.encode(docs)
        assert [sample_tokenizer.decode(ids) for ids in encoded] == docs, lang
        assert encoded[0] == sample_tokenizer.encode_one(docs[0])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(VALID_TEXT, WHITESPACE_HEAVY))
def test_round_trip_on_arbitrary_unicode(small_tokenizer, sample_tokenizer, text):
    for tok in (small_tokenizer, sample_tokenizer):
        assert tok.decode(tok.encode_one(text)) == text


def test_documented_exceptions_to_round_trips(small_tokenizer):
    assert small_tokenizer.decode(small_tokenizer.encode_one("a\u2581b")) == "a b"
    with pytest.raises(TokenizerError, match="surrogate"):
        small_tokenizer.encode(["lone \udc80 surrogate"])


def test_special_ids_are_where_the_card_says(small_tokenizer):
    tok, card = small_tokenizer, small_tokenizer.card
    assert (card["unk_id"], card["eos_id"], tok.eos_id) == (0, 1, 1)
    assert tok.piece(card["eos_id"]) == "</s>" and tok.piece(card["unk_id"]) == "<unk>"
    assert card["dataset_id_token_ids"] == list(range(2, 12))
    for i, piece in enumerate(card["dataset_id_tokens"]):
        assert tok.dataset_token(i) == 2 + i and tok.piece(tok.dataset_token(i)) == piece == f"<ds{i}>"
    assert tok.vocab_size == card["vocab_size"] == 400
    with pytest.raises(IndexError, match="dataset id 10 is out of range"):
        tok.dataset_token(10)


def test_control_tokens_never_come_from_text_and_decode_to_nothing(small_tokenizer):
    tok = small_tokenizer
    text = "<ds0></s><unk> plain"
    ids = tok.encode_one(text)
    assert min(ids) >= 12
    assert tok.decode([tok.dataset_token(3)] + ids + [tok.eos_id]) == text


def test_vocab_size_must_fit_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        train_tokenizer(["sample:en"], tmp_path / "tok", vocab_size=65536)


def test_load_errors_name_the_missing_or_edited_file(small_tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="missing"):
        Tokenizer.load(tmp_path / "nowhere")
    copy = tmp_path / "tok"
    shutil.copytree(small_tokenizer.directory, copy)
    assert Tokenizer.load(copy).fingerprint == small_tokenizer.fingerprint
    with open(copy / MODEL_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(TokenizerError, match="sha256.*retrain"):
        Tokenizer.load(copy)
    (copy / CARD_FILE).unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is missing"):
        Tokenizer.load(copy)


def test_training_replaces_a_tokenizer_folder_only_on_success(small_corpus_dir, tmp_path):
    out = tmp_path / "tok"
    first = train_tokenizer([f"files:{small_corpus_dir}/*.txt"], out, vocab_size=390, seed=1)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TokenizerError, match="yielded no text"):
        train_tokenizer([f"files:{tmp_path}/empty.txt"], out, vocab_size=390)
    assert Tokenizer.load(out).fingerprint == first.fingerprint
    second = train_tokenizer([f"files:{small_corpus_dir}/*.txt"], out, vocab_size=400)
    assert json.loads((out / CARD_FILE).read_text())["vocab_size"] == second.vocab_size == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "tok"]  # no temp folders left
    again = train_tokenizer([f"files:{small_corpus_dir}/*.txt"], tmp_path / "again", vocab_size=400)
    assert again.fingerprint == second.fingerprint  # training is deterministic


def test_training_refuses_to_replace_other_folders(small_corpus_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(TokenizerError, match="not a tokenizer folder"):
        train_tokenizer([f"files:{small_corpus_dir}/*.txt"], tmp_path, vocab_size=400)
    assert (tmp_path / "notes.txt").read_text() == "precious"


# --- helpers the notebooks call ---------------------------------------------------------------


def test_pieces_and_decode_rows(small_tokenizer):
    from forgetting_lib.prep.tokenizer import EOS_ID

    text = "The quick brown fox"
    pieces = small_tokenizer.pieces(text)
    assert "".join(pieces).replace("▁", " ").strip() == text
    ds0 = small_tokenizer.dataset_token(0)
    rows = [[ds0, *small_tokenizer.encode_one("ab")], [ds0, *small_tokenizer.encode_one("cd"), EOS_ID]]
    assert small_tokenizer.decode_rows(rows) == ["ab", "cd"]  # id and EOS tokens decode to nothing


def test_train_or_load_reuses_only_matching_settings(small_corpus_dir, tmp_path):
    from forgetting_lib.prep.tokenizer import train_or_load

    corpora = [f"files:{small_corpus_dir}/*.txt"]
    first = train_or_load(corpora, tmp_path / "tok", vocab_size=400, chars_per_corpus=10_000)
    mtime = (tmp_path / "tok" / MODEL_FILE).stat().st_mtime_ns
    again = train_or_load(corpora, tmp_path / "tok", vocab_size=400, chars_per_corpus=10_000)
    assert again.fingerprint == first.fingerprint
    assert (tmp_path / "tok" / MODEL_FILE).stat().st_mtime_ns == mtime  # not retrained
    other = train_or_load(corpora, tmp_path / "tok", vocab_size=420, chars_per_corpus=10_000)
    assert other.vocab_size == 420


def test_compression_stats_count_words_chars_and_tokens(small_tokenizer, small_corpus_dir, small_docs):
    from forgetting_lib.prep.tokenizer import compression_stats

    [row] = compression_stats(small_tokenizer, {"small": f"files:{small_corpus_dir}/*.txt"}, max_documents=2)
    docs = small_docs[:2]
    assert row["documents"] == 2 and row["chars"] == sum(map(len, docs))
    assert row["words"] == sum(len(d.split()) for d in docs)
    assert row["tokens"] == sum(len(small_tokenizer.encode_one(d)) for d in docs)
    assert row["tokens_per_word"] == pytest.approx(row["tokens"] / row["words"])
    assert row["chars_per_token"] == pytest.approx(row["chars"] / row["tokens"])
