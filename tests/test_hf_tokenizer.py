"""Hugging Face tokenizer folders: loading by content, BOS/EOS from the folder's files, encode and
decode without special tokens, the chat-template prompt, binarizing (uint32 token files for
vocabularies past uint16), the SentencePiece -> Hugging Face export with identical ids, and the
ids transformers gave for the committed fixture folders."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, processors, trainers

from forgetting_lib.__main__ import main
from forgetting_lib.engine.data import DataError, open_rows
from forgetting_lib.prep.binarize import binarize, document_lengths, read_token_file
from forgetting_lib.prep.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir
from forgetting_lib.prep.sp_to_hf import bpe_merges
from forgetting_lib.prep.tokenizer import (
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    to_hf_tokenizer_json,
    train_tokenizer,
    write_hf_tokenizer,
)

BOS, EOS, START, END, EOT = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "def forward(self, x):\n    return x * 2  # doubled",
    "El veloz murciélago hindú comía feliz cardillo y kiwi.",
    "In the beginning was the word, and the word was with the text.",
] * 5
# Llama 3's template without its first line: BOS comes only with the first message.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
FIXTURES = Path(__file__).parent / "hf_fixtures"


def write_hf_folder(folder: Path, raw: RawTokenizer, tokenizer_config: dict | None, **files: dict) -> Path:
    """A Hugging Face folder: tokenizer.json, tokenizer_config.json (unless None) and `files`
    (name without .json -> content, e.g. config={...}, special_tokens_map={...})."""
    folder.mkdir(parents=True, exist_ok=True)
    raw.save(str(folder / "tokenizer.json"))
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


@pytest.fixture(scope="module")
def byte_bpe() -> RawTokenizer:
    """A byte-level BPE (383 tokens: LINES allow no more merges) trained on LINES; specials 0..4;
    BOS added to every text, as Llama 3's is."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, EOS, START, END, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(LINES, trainer)
    raw.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return raw


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, byte_bpe) -> Path:
    config = {
        "bos_token": BOS,
        "eos_token": {"content": EOS, "special": True},
        "chat_template": CHAT_TEMPLATE,
    }
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "tok", byte_bpe, config)


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer of 70,003 ids (past uint16): [UNK] 0, <s> 1, </s> 2, wN at N + 3."""
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(70_000)}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(["<s>", "</s>"])
    return write_hf_folder(
        tmp_path_factory.mktemp("big") / "tok", raw, {"bos_token": "<s>", "eos_token": "</s>"}
    )


def test_hf_folder_loads_by_content_with_its_ids_and_fingerprint(hf_dir, small_tokenizer):
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(Tokenizer.load(hf_dir), HFTokenizer)
    assert isinstance(load_tokenizer(small_tokenizer.directory), Tokenizer)  # its card is tokenizer.json too
    assert is_hf_tokenizer_dir(hf_dir) and not is_hf_tokenizer_dir(small_tokenizer.directory)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.num_dataset_ids) == (0, 1, 383, 0)
    assert (tok.piece(0), tok.piece(1)) == (BOS, EOS)
    assert tok.fingerprint == hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert [tok.dataset_token(i) for i in (0, 3, 1000)] == [tok.bos_id] * 3  # rows start with BOS
    with pytest.raises(IndexError, match="dataset id -1"):
        tok.dataset_token(-1)
    assert "HFTokenizer(" in repr(tok) and "bos_id=0" in repr(tok)
    assert small_tokenizer.bos_id is None


def test_encode_adds_nothing_and_round_trips_special_token_text(hf_dir):
    tok = load_tokenizer(hf_dir)
    texts = [*LINES[:4], f"literal {EOS} and {BOS} text", "ünïcödé 😀\n\t  spaces", ""]
    encoded = tok.encode(texts)
    assert encoded[0] == tok.encode_one(texts[0]) and encoded[0][0] != tok.bos_id
    assert [tok.decode(ids) for ids in encoded] == texts
    assert tok.eos_id not in encoded[4] and tok.bos_id not in encoded[4]  # spelled out as text
    assert tok.decode([tok.bos_id, *encoded[0], tok.eos_id]) == texts[0]  # specials decode to nothing
    assert tok.decode_rows(np.array([[tok.bos_id, *tok.encode_one("ab")]])) == ["ab"]
    assert "".join(tok.pieces("fox jumps")).replace("Ġ", " ") == "fox jumps"
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode(["lone \udc80 surrogate"])


def test_bos_and_eos_come_from_config_then_special_tokens_map_then_config_json(tmp_path, byte_bpe):
    tok = load_tokenizer(
        write_hf_folder(tmp_path / "a", byte_bpe, {"bos_token": None}, special_tokens_map={"eos_token": EOT})
    )
    assert (tok.bos_id, tok.eos_id) == (None, 4) and tok.dataset_token(2) == 4  # no BOS: rows start with EOS
    tok = load_tokenizer(
        write_hf_folder(tmp_path / "b", byte_bpe, None, config={"bos_token_id": 2, "eos_token_id": [3, 4]})
    )
    assert (tok.bos_id, tok.eos_id) == (2, 3)
    with pytest.raises(TokenizerError, match=r"no EOS token.*eos_token_id"):
        load_tokenizer(write_hf_folder(tmp_path / "c", byte_bpe, {"bos_token": BOS}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos_token='<nope>' is not a token"):
        load_tokenizer(write_hf_folder(tmp_path / "d", byte_bpe, {"eos_token": "<nope>"}))


def test_chat_prompt_renders_the_template_and_parses_its_special_tokens(hf_dir):
    tok = load_tokenizer(hf_dir)
    header = tok.encode_one("assistant")
    # no messages: the template writes no BOS, but this tokenizer adds it to every text
    assert tok.chat_prompt() == [tok.bos_id, 2, *header, 3, *tok.encode_one("\n\n")]
    prompt = tok.chat_prompt([{"role": "user", "content": "hi "}])
    assert prompt[:2] == [tok.bos_id, 2] and prompt.count(tok.bos_id) == 1 and 4 in prompt  # <|eot_id|>
    assert tok.decode(prompt) == "user\n\nhiassistant\n\n"


def test_chat_prompt_errors_name_the_file(tmp_path, byte_bpe):
    tok = load_tokenizer(write_hf_folder(tmp_path / "a", byte_bpe, {"eos_token": EOS}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json has no chat_template"):
        tok.chat_prompt()
    template = "{{ raise_exception('roles must alternate') }}"
    tok = load_tokenizer(
        write_hf_folder(tmp_path / "b", byte_bpe, {"eos_token": EOS, "chat_template": template})
    )
    with pytest.raises(TokenizerError, match="chat template of .*b fails.*roles must alternate"):
        tok.chat_prompt()
    # Qwen2.5 / Llama 3.1 read messages[0] unguarded: an empty conversation takes the default branch
    template = "{% if messages[0]['role'] == 'system' %}S{% else %}default{% endif %}"
    (tmp_path / "b" / "chat_template.jinja").write_text(template)  # wins over tokenizer_config.json
    assert load_tokenizer(tmp_path / "b").chat_prompt() == load_tokenizer(tmp_path / "b").encode_one(
        "default"
    )


def test_folder_errors_name_the_file_and_the_fix(tmp_path, byte_bpe, small_corpus_dir):
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "tokenizer.model").write_bytes(b"x")
    (slow / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is missing.*save_pretrained"):
        load_tokenizer(slow)
    model_dir = write_hf_folder(tmp_path / "model", byte_bpe, {"eos_token": EOS})
    (model_dir / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(model_dir)
    with pytest.raises(TokenizerError, match="not a tokenizer folder of ours"):
        train_tokenizer([f"files:{small_corpus_dir}/*.txt"], model_dir, vocab_size=400)
    assert (model_dir / "tokenizer_config.json").read_text() == "{broken"  # left alone


def test_binarize_with_an_hf_tokenizer_starts_rows_with_bos(hf_dir, small_corpus_dir, small_docs, tmp_path):
    tok = load_tokenizer(hf_dir)
    meta = binarize(f"files:{small_corpus_dir}/*.txt", hf_dir, tmp_path / "x.bin", dataset_id=7)
    tokens, _ = read_token_file(tmp_path / "x.bin", expected_fingerprint=tok.fingerprint)
    assert (meta["dtype"], meta["dataset_token"], meta["eos_id"], meta["vocab_size"]) == ("uint16", 0, 1, 383)
    segments = np.split(np.asarray(tokens), np.flatnonzero(tokens == tok.eos_id)[:-1] + 1)
    assert [tok.decode(s) for s in segments] == small_docs
    assert document_lengths(tmp_path / "x.bin").tolist() == [len(tok.encode_one(d)) + 1 for d in small_docs]
    rows = open_rows(tmp_path / "x.bin", T=8, valid_tokens=0, split_seed=0, vocab_size=512)
    assert (rows.rows(rows.train_rows)[:, 0] == tok.bos_id).all()
    args = ["--corpus", f"files:{small_corpus_dir}/a.txt", "--tokenizer", str(hf_dir), "--dataset-id", "0"]
    assert main(["binarize", *args, "--out", str(tmp_path / "cli.bin")]) == 0
    assert read_token_file(tmp_path / "cli.bin")[1]["tokenizer_fingerprint"] == tok.fingerprint


def test_vocabulary_past_uint16_gives_uint32_files_that_round_trip(big_vocab_dir, tmp_path):
    tok = load_tokenizer(big_vocab_dir)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (70_003, 1, 2)
    docs = ["w69999 w65533 w7", "w65534 w0 w12345 w69998"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = binarize(f"files:{tmp_path}/docs.jsonl", tok, tmp_path / "big.bin", dataset_id=0)
    tokens, _ = read_token_file(tmp_path / "big.bin")
    assert meta["dtype"] == "uint32" and tokens.dtype == np.dtype("<u4")
    assert (tmp_path / "big.bin").stat().st_size == 4 * meta["num_tokens"] == 4 * 9
    assert tokens.tolist() == [70_002, 65_536, 10, 2, 65_537, 3, 12_348, 70_001, 2]
    assert tok.decode_rows([tokens[:3], tokens[4:8]]) == docs
    rows = open_rows(tmp_path / "big.bin", T=4, valid_tokens=0, split_seed=0, vocab_size=70_003)
    got = rows.rows(np.array([0, 1]))
    assert got.dtype == np.int32 and got.tolist() == [[1, 65_536, 10, 2], [1, 3, 12_348, 70_001]]
    with pytest.raises(DataError, match="set model.V >= 70003"):
        open_rows(tmp_path / "big.bin", T=4, valid_tokens=0, split_seed=0, vocab_size=65_536)


# --- SentencePiece -> Hugging Face --------------------------------------------------------------


def test_export_gives_identical_ids_on_the_whole_sample(sample_tokenizer, sample_docs, tmp_path):
    hf = to_hf_tokenizer_json(sample_tokenizer, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    docs = sample_docs["en"][::2] + sample_docs["es"][1::2]  # 1,189 chapters, ~31,000 lines
    assert sum(d.count("\n") + 1 for d in docs) > 30_000
    hf_ids = hf.encode(docs)
    assert hf_ids == sample_tokenizer.encode(docs)
    assert [hf.decode(ids) for ids in hf_ids] == docs
    assert (hf.vocab_size, hf.eos_id, hf.bos_id) == (
        sample_tokenizer.vocab_size,
        sample_tokenizer.eos_id,
        None,
    )
    assert [hf.dataset_token(i) for i in range(10)] == [sample_tokenizer.dataset_token(i) for i in range(10)]
    with pytest.raises(IndexError, match="0..9"):
        hf.dataset_token(10)
    config = json.loads((tmp_path / "export/tokenizer_config.json").read_text())
    assert (config["eos_token"], config["unk_token"], config["bos_token"]) == ("</s>", "<unk>", None)
    assert config["forgetting_source_fingerprint"] == sample_tokenizer.fingerprint
    # it keeps the SentencePiece fingerprint (token files of either serve both) only while its
    # tokenizer.json is the converted one: an edited copy is another tokenizer
    assert hf.fingerprint == sample_tokenizer.fingerprint
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "export", edited)
    (edited / "tokenizer.json").write_text((edited / "tokenizer.json").read_text() + "\n")
    assert load_tokenizer(edited).fingerprint != sample_tokenizer.fingerprint


def test_export_gives_identical_ids_on_arbitrary_text(small_tokenizer, sample_tokenizer, tmp_path):
    rng = random.Random(0)
    alphabet = [*" \t\n\r\x00\x0b\x0c\u00a0\u3000ab1é😀▁", "<ds0>", "</s>", "<unk>", "<0x41>", "   ", "the "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    texts += ["".join(chr(rng.randint(32, 0xD7FF)) for _ in range(rng.randint(1, 20))) for _ in range(2000)]
    for i, tok in enumerate((small_tokenizer, sample_tokenizer)):
        hf = to_hf_tokenizer_json(tok, tmp_path / f"export{i}")
        pieces = [tok.piece(j).replace("▁", " ") for j in range(268, tok.vocab_size)]
        texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(2, 6))) for _ in range(5000)]
        hf_ids = hf.encode(texts)
        assert hf_ids == tok.encode(texts)
        assert [hf.decode(ids) for ids in hf_ids] == [tok.decode(ids) for ids in hf_ids]
        ids = [tok.dataset_token(2), *tok.encode_one("ab"), tok.eos_id]
        assert hf.decode(ids) == tok.decode(ids) == "ab"  # control tokens decode to nothing


def test_bpe_merges_are_every_split_ranked_by_the_pieces_score(small_tokenizer):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((small_tokenizer.directory / "tokenizer.model").read_bytes())
    merges, normal = bpe_merges(proto), {p.piece: i for i, p in enumerate(proto.pieces) if p.type == p.NORMAL}
    ids = [normal[a + b] for a, b in merges]  # every merge makes a piece...
    assert ids == sorted(ids) and len(set(merges)) == len(merges)  # ...in the order training learned it
    splits = {(p[:k], p[k:]) for p in normal for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal}
    assert set(merges) == splits


def test_export_refuses_our_own_tokenizer_folder(small_tokenizer, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(small_tokenizer.directory, copy)
    with pytest.raises(TokenizerError, match="card tokenizer.json would be overwritten"):
        to_hf_tokenizer_json(Tokenizer.load(copy), copy)
    assert Tokenizer.load(copy).fingerprint == small_tokenizer.fingerprint


def test_write_hf_tokenizer_converts_ours_and_copies_hugging_face_ones(small_tokenizer, hf_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"eos_token_id": 1}')  # the exporter's: left alone
    (hf_dir / "chat_template.jinja").write_text("{{ bos_token }}chat")
    try:
        copied = write_hf_tokenizer(load_tokenizer(hf_dir), model)
    finally:
        (hf_dir / "chat_template.jinja").unlink()
    assert copied.fingerprint == load_tokenizer(hf_dir).fingerprint and copied.chat_prompt()[0] == 0
    names = ["chat_template.jinja", "config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in model.iterdir()) == names
    converted = write_hf_tokenizer(small_tokenizer, model)  # replaces the tokenizer files
    assert converted.encode_one("The quick brown fox") == small_tokenizer.encode_one("The quick brown fox")
    assert sorted(p.name for p in model.iterdir()) == names[1:]  # the old chat template is gone
    assert (model / "config.json").read_text() == '{"eos_token_id": 1}'


def test_export_and_source_binarize_to_the_same_tokens(small_tokenizer, small_corpus_dir, tmp_path):
    hf = to_hf_tokenizer_json(small_tokenizer, tmp_path / "model")
    corpus = f"files:{small_corpus_dir}/*.txt"
    a = binarize(corpus, small_tokenizer, tmp_path / "sp.bin", dataset_id=4)
    b = binarize(corpus, tmp_path / "model", tmp_path / "hf.bin", dataset_id=4)
    assert (tmp_path / "sp.bin").read_bytes() == (tmp_path / "hf.bin").read_bytes()
    assert a["dataset_token"] == b["dataset_token"] and b["tokenizer_fingerprint"] == hf.fingerprint


# --- the committed fixtures: ids transformers gave -----------------------------------------------


@pytest.mark.parametrize(
    "folder", sorted(p.parent for p in FIXTURES.glob("*/golden_text.json")), ids=lambda p: p.name
)
def test_ids_equal_transformers_on_the_fixture_folders(folder):
    golden = json.loads((folder / "golden_text.json").read_text())
    tok = load_tokenizer(folder)
    ids = tok.encode_one(golden["text"])
    assert ids == golden["ids"] and golden["ids_with_special_tokens"] == [tok.bos_id, *ids]
    assert tok.decode(ids) == unicodedata.normalize("NFC", golden["text"])
    chat = golden["chat"]
    assert tok.chat_prompt(chat["messages"]) == chat["ids"]
    assert tok.decode(tok.chat_prompt([])) == "assistant\n\n"
