"""SentencePiece BPE tokenizer with exact round trips, an EOS id and reserved dataset-id tokens.

Layout of the id space: 0 `<unk>`, 1 `</s>` (EOS, appended after every document by binarize),
2.. `<ds0>`, `<ds1>`, ... (dataset-id control tokens), then 256 byte pieces, then learned pieces.
Control tokens never come out of `encode` (the text "<ds0>" is spelled out in ordinary pieces)
and `decode` drops them, so `decode(encode(t)) == t`.

Round trips are exact for any valid Unicode text (identity normalisation, no whitespace
cleanup, byte fallback) with one exception: U+2581 LOWER ONE EIGHTH BLOCK ("▁") is the
character SentencePiece uses internally for a space, so it decodes as " ". Strings with lone
surrogates are not valid Unicode (they cannot be UTF-8 encoded) and are rejected by `encode`.

A tokenizer folder holds `tokenizer.model` and `tokenizer.json` (the card: ids, training
corpora, and `fingerprint`, the sha256 of the model file, which token files record).

`load_tokenizer` opens either this kind of folder or a Hugging Face one (a pretrained model's
`tokenizer.json` in the `tokenizers` format: `hf_tokenizer.HFTokenizer`, the same interface),
telling them apart by the content of `tokenizer.json`. `write_hf_tokenizer` puts a tokenizer of
either kind into an exported model folder as a Hugging Face one (this kind converted by `sp_to_hf`,
with the same ids).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from ..fileio import atomic_write_bytes
from . import sp_to_hf
from .corpora import iter_documents
from .hf_tokenizer import (
    CONVERTED_SHA_KEY,
    HF_CONFIG_FILE,
    HF_TOKENIZER_FILE,
    HF_TOKENIZER_FILES,
    HFTokenizer,
    is_hf_tokenizer_dir,
)
from .tokenizer_error import TokenizerError

MODEL_FILE, CARD_FILE = "tokenizer.model", "tokenizer.json"
CARD_FORMAT = "forgetting-tokenizer-v1"
MAX_VOCAB_SIZE = 65535  # ids fit uint16: token files of ours take 2 bytes a token
UNK_ID, EOS_ID = 0, 1


def load_tokenizer(directory: str | Path) -> "Tokenizer | HFTokenizer":
    """Open a tokenizer folder: a Hugging Face one (see `is_hf_tokenizer_dir`) as an HFTokenizer,
    else one of ours as a (SentencePiece) Tokenizer. Both offer what binarize and the engine use."""
    if is_hf_tokenizer_dir(directory):
        return HFTokenizer.load(directory)
    return Tokenizer.load_sentencepiece(directory)


def write_hf_tokenizer(tok: "Tokenizer | HFTokenizer", out_dir: str | Path) -> HFTokenizer:
    """Put `tok` into `out_dir` (an exported model folder) as a Hugging Face tokenizer: one of ours
    converted (`to_hf_tokenizer_json`), a Hugging Face one copied (its tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, chat_template.jinja). Each file is written
    atomically, and those of the four it does not write are removed (a previous tokenizer's);
    nothing else in `out_dir` is touched. Returns the written folder loaded."""
    if isinstance(tok, Tokenizer):
        return to_hf_tokenizer_json(tok, out_dir)
    out_dir = Path(out_dir)
    if out_dir.resolve() != tok.directory.resolve():
        names = [name for name in HF_TOKENIZER_FILES if (tok.directory / name).is_file()]
        _replace_hf_tokenizer_files(out_dir, {name: (tok.directory / name).read_bytes() for name in names})
    return HFTokenizer.load(out_dir)


def to_hf_tokenizer_json(tok: "Tokenizer", out_dir: str | Path) -> HFTokenizer:
    """Write our tokenizer `tok` into `out_dir` as a Hugging Face one with the same ids (see
    `sp_to_hf`): tokenizer.json and tokenizer_config.json (EOS `</s>`, unk `<unk>`, no BOS, the
    dataset-id tokens, the source fingerprint), each atomically, nothing else. `out_dir` may be
    (or become) a model folder; one of our tokenizer folders is refused (its card is also called
    tokenizer.json). Returns the written folder loaded."""
    out_dir = Path(out_dir)
    hf, config = sp_to_hf.convert(
        tok.directory / MODEL_FILE,
        dataset_id_tokens=[tok.piece(tok.dataset_token(i)) for i in range(tok.num_dataset_ids)],
        fingerprint=tok.fingerprint,
    )
    tokenizer_json = hf.to_str(pretty=True) + "\n"
    config[CONVERTED_SHA_KEY] = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
    files = {HF_TOKENIZER_FILE: tokenizer_json, HF_CONFIG_FILE: json.dumps(config, indent=2) + "\n"}
    _replace_hf_tokenizer_files(out_dir, {name: text.encode("utf-8") for name, text in files.items()})
    return HFTokenizer.load(out_dir)


def _replace_hf_tokenizer_files(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name -> content, names from HF_TOKENIZER_FILES) into `out_dir` atomically,
    tokenizer.json first, and remove the other HF_TOKENIZER_FILES there; refuse one of our
    tokenizer folders (its card is also called tokenizer.json)."""
    _check_not_ours(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in HF_TOKENIZER_FILES:
        if name in files:
            atomic_write_bytes(out_dir / name, files[name])
        else:
            (out_dir / name).unlink(missing_ok=True)


def _check_not_ours(out_dir: Path) -> None:
    """Refuse to write Hugging Face files into one of our tokenizer folders."""
    card = out_dir / CARD_FILE
    ours = (out_dir / MODEL_FILE).exists() and not is_hf_tokenizer_dir(out_dir)
    if not ours and card.is_file() and card.stat().st_size < 1 << 20:
        try:
            ours = json.loads(card.read_text(encoding="utf-8")).get("format") == CARD_FORMAT
        except (ValueError, AttributeError):  # not JSON, or not an object: not a card
            pass
    if ours:
        raise TokenizerError(
            f"{out_dir} holds a tokenizer of ours, whose card {CARD_FILE} would be overwritten; "
            "write the Hugging Face tokenizer into another folder (e.g. the exported model's)"
        )


def dataset_token_piece(i: int) -> str:
    """The piece string of dataset-id token `i`, e.g. `<ds0>`."""
    return f"<ds{i}>"


def train_tokenizer(
    corpora: Sequence[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 4096,
    chars_per_corpus: int = 2_000_000,
    num_dataset_ids: int = 10,
    seed: int = 0,
    byte_fallback: bool = True,
) -> "Tokenizer":
    """Train a BPE tokenizer on a balanced sample (the first `chars_per_corpus` characters of each
    corpus, documents split into lines) and save it to `out_dir` atomically.

    An existing `out_dir` is replaced only after training succeeds, and only if it holds a
    previous tokenizer (or nothing). Returns the loaded Tokenizer. `byte_fallback=False` saves
    the 256 byte pieces for a corpus whose every character the sample covers (a `synthetic:`
    pair: a small vocabulary then holds its whole lexicon).
    """
    if not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size}: must be between 1 and {MAX_VOCAB_SIZE} (trained "
            "tokenizers keep ids within uint16, so their token files take 2 bytes a token)"
        )
    if not corpora:
        raise TokenizerError("train_tokenizer needs at least one corpus (e.g. sample:en)")
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    sentences, chars = _sample_sentences(corpora, chars_per_corpus, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        (tmp / MODEL_FILE).write_bytes(
            _run_trainer(iter(sentences), vocab_size, num_dataset_ids, byte_fallback)
        )
        card = {
            "format": CARD_FORMAT,
            "model_type": "bpe",
            "vocab_size": vocab_size,
            "unk_id": UNK_ID,
            "eos_id": EOS_ID,
            "dataset_id_tokens": [dataset_token_piece(i) for i in range(num_dataset_ids)],
            "dataset_id_token_ids": list(range(EOS_ID + 1, EOS_ID + 1 + num_dataset_ids)),
            "corpora": list(corpora),
            "chars_per_corpus": chars_per_corpus,
            "chars_sampled": chars,
            "seed": seed,
            "byte_fallback": byte_fallback,
            "fingerprint": _sha256(tmp / MODEL_FILE),
            "sentencepiece_version": spm.__version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer.load_sentencepiece(out_dir)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to overwrite a folder that is not one of our tokenizer folders (it may hold other
    work, e.g. a Hugging Face model folder, whose tokenizer.json is no card of ours)."""
    if out_dir.exists() and any(out_dir.iterdir()):
        ours = (out_dir / CARD_FILE).exists() or (out_dir / MODEL_FILE).exists()
        if not ours or is_hf_tokenizer_dir(out_dir):
            raise TokenizerError(
                f"{out_dir} exists and is not a tokenizer folder of ours; pick a new --out "
                "folder (an existing tokenizer folder trained here would be replaced)"
            )


def _sample_sentences(
    corpora: Sequence[str], chars_per_corpus: int, seed: int
) -> tuple[list[str], dict[str, int]]:
    """The first `chars_per_corpus` characters of each corpus, as non-empty lines."""
    sentences: list[str] = []
    chars: dict[str, int] = {}
    for spec in corpora:
        taken = 0
        for doc in iter_documents(spec, seed=seed):
            for line in doc.split("\n"):
                if line and taken < chars_per_corpus:
                    sentences.append(line[: chars_per_corpus - taken])
                    taken += len(sentences[-1])
            if taken >= chars_per_corpus:
                break
        if taken == 0:
            raise TokenizerError(
                f"corpus {spec!r} yielded no text; check the spec (empty files? wrong text_field?)"
            )
        chars[spec] = taken
    return sentences, chars


def _run_trainer(sentences: Iterable[str], vocab_size: int, num_ids: int, byte_fallback: bool) -> bytes:
    """Run SentencePiece with the settings that make round trips exact (see module docstring);
    returns the model bytes. Writing through `model_writer` rather than a `model_prefix` path
    keeps the (temporary) path out of the model, so equal inputs give equal fingerprints."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=byte_fallback,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=1.0,
            bos_id=-1,
            pad_id=-1,
            unk_id=UNK_ID,
            eos_id=EOS_ID,
            control_symbols=[dataset_token_piece(i) for i in range(num_ids)],
            max_sentence_length=1 << 20,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise TokenizerError(
            f"SentencePiece training failed: {err} (set --vocab-size to a value "
            "the message allows, or train on more text)"
        ) from err
    return model.getvalue()


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; a previous `out_dir` is removed only after the rename."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Tokenizer:
    """A trained tokenizer folder: encode/decode plus the ids binarize and data loading need."""

    def __init__(self, directory: Path, processor: spm.SentencePieceProcessor, card: dict):
        self.directory, self._sp, self.card = directory, processor, card
        self.num_threads = os.cpu_count() or 1

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer | HFTokenizer":
        """Load `directory` as `load_tokenizer` does: a Hugging Face folder gives an HFTokenizer
        (kept so that callers written before those folders read them too)."""
        return load_tokenizer(directory)

    @classmethod
    def load_sentencepiece(cls, directory: str | Path) -> "Tokenizer":
        """Load our tokenizer folder `directory`, checking the model file against the card's
        fingerprint."""
        directory = Path(directory)
        model, card_path = directory / MODEL_FILE, directory / CARD_FILE
        for path in (directory, model, card_path):
            if not path.exists():
                raise TokenizerError(
                    f"tokenizer {directory}: {path} is missing; train one with "
                    f"`python -m forgetting_lib tokenizer --out {directory} ...`"
                )
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{card_path} is not valid JSON ({err}); retrain the tokenizer") from None
        actual = _sha256(model)
        if card.get("fingerprint") != actual:
            raise TokenizerError(
                f"{model} has sha256 {actual[:12]}… but {card_path} says "
                f"{str(card.get('fingerprint'))[:12]}…: the folder was edited; "
                "retrain the tokenizer"
            )
        processor = spm.SentencePieceProcessor(model_file=str(model))
        ids = [processor.piece_to_id(p) for p in card["dataset_id_tokens"]]
        if (processor.get_piece_size(), processor.eos_id(), ids) != (
            card["vocab_size"],
            card["eos_id"],
            card["dataset_id_token_ids"],
        ):
            raise TokenizerError(
                f"{card_path} disagrees with {model} on vocab_size, eos_id or "
                "dataset-id token ids; retrain the tokenizer"
            )
        return cls(directory, processor, card)

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids are 0..vocab_size-1)."""
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        """Id of `</s>`, appended after every document."""
        return self._sp.eos_id()

    @property
    def bos_id(self) -> None:
        """None: this tokenizer has no BOS; rows start with a dataset-id token instead (an
        HFTokenizer's `bos_id` is its model's BOS)."""
        return None

    @property
    def fingerprint(self) -> str:
        """sha256 of the model file; token files record it."""
        return self.card["fingerprint"]

    @property
    def num_dataset_ids(self) -> int:
        """How many dataset-id tokens are reserved."""
        return len(self.card["dataset_id_token_ids"])

    def dataset_token(self, i: int) -> int:
        """Token id of dataset-id token `i` (0 <= i < num_dataset_ids)."""
        if not 0 <= i < self.num_dataset_ids:
            raise IndexError(
                f"dataset id {i} is out of range: tokenizer {self.directory} reserves "
                f"dataset ids 0..{self.num_dataset_ids - 1} (train with more num_dataset_ids)"
            )
        return self.card["dataset_id_token_ids"][i]

    def piece(self, token_id: int) -> str:
        """The piece string of `token_id` (e.g. `</s>`, `<ds0>`, `<0x0A>`, `▁the`)."""
        return self._sp.id_to_piece(token_id)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel on `num_threads` threads; no EOS added."""
        try:
            return self._sp.encode(list(texts), num_threads=self.num_threads)
        except (RuntimeError, TypeError) as err:  # what SentencePiece raises for non-UTF-8-able input
            raise TokenizerError(
                f"cannot encode: {err}; texts must be str of valid Unicode (no "
                "lone surrogates: read files with encoding='utf-8')"
            ) from err

    def encode_one(self, text: str) -> list[int]:
        """Token ids of one text."""
        return self.encode([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; EOS and dataset-id control tokens decode to nothing."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._sp.decode(ids)

    def decode_rows(self, rows: Iterable[Iterable[int]]) -> list[str]:
        """Text of each row of a [B, T] token array (e.g. sampled or data rows)."""
        return [self.decode(row) for row in rows]

    def pieces(self, text: str) -> list[str]:
        """The piece strings `text` is cut into (`▁` marks a space)."""
        return [self.piece(i) for i in self.encode_one(text)]

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.directory)!r}, vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


def train_or_load(
    corpora: Sequence[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 4096,
    chars_per_corpus: int = 2_000_000,
    byte_fallback: bool = True,
) -> Tokenizer:
    """The tokenizer in `out_dir` if it was trained on `corpora` with these settings, else a new
    one trained there (what notebooks and the quickstart call: rerunning reuses the work)."""
    try:
        tok = Tokenizer.load_sentencepiece(out_dir)
        card = tok.card
        if (card["corpora"], tok.vocab_size, card["chars_per_corpus"], card.get("byte_fallback", True)) == (
            list(corpora),
            vocab_size,
            chars_per_corpus,
            byte_fallback,
        ):
            return tok
    except TokenizerError:
        pass
    return train_tokenizer(
        corpora,
        out_dir,
        vocab_size=vocab_size,
        chars_per_corpus=chars_per_corpus,
        byte_fallback=byte_fallback,
    )


def compression_stats(tok: Tokenizer, corpora: dict[str, str], *, max_documents: int = 200) -> list[dict]:
    """Per corpus (name -> spec), over its first `max_documents` documents: characters, words
    (whitespace-separated), tokens, tokens per word and characters per token.

    A tokenizer trained on a mix spends its pieces where text is frequent; a language that gets
    more tokens per word costs the model more positions (and more loss per word) for the same text.
    """
    out = []
    for name, spec in corpora.items():
        docs = [doc for _, doc in zip(range(max_documents), iter_documents(spec))]
        chars, words = sum(map(len, docs)), sum(len(doc.split()) for doc in docs)
        tokens = sum(map(len, tok.encode(docs)))
        out.append(
            {
                "corpus": name,
                "spec": spec,
                "documents": len(docs),
                "chars": chars,
                "words": words,
                "tokens": tokens,
                "tokens_per_word": tokens / max(words, 1),
                "chars_per_token": chars / max(tokens, 1),
            }
        )
    return out
