"""SentencePiece -> Hugging Face: one of our tokenizers as a `tokenizers`-format `tokenizer.json`
(+ `tokenizer_config.json`) that gives the same ids, for an exported model folder that
`transformers` and `tokenizers` load (`tokenizer.to_hf_tokenizer_json` writes it).

Our SentencePiece model (see `tokenizer._run_trainer`) is BPE with identity normalisation, no
dummy prefix, no whitespace cleanup, " " escaped as "▁", byte fallback and control tokens. Its
Hugging Face twin:
- model: `tokenizers.models.BPE` with every piece at its id, the merges derived below,
  `byte_fallback` (a character outside the vocabulary becomes its UTF-8 byte pieces `<0x..>`),
  and `<unk>` as the unknown token (consecutive unknowns fused, as SentencePiece does);
- pre-tokenizer: Metaspace (" " -> "▁", nothing prepended, no split: SentencePiece merges across
  the whole text, so BPE must see it as one word);
- decoder: "▁" -> " ", byte pieces -> bytes -> UTF-8, fused;
- control pieces (`<unk>`, `</s>`, `<ds0>`, ...) as special added tokens at their ids.

Merges. SentencePiece BPE encodes by merging, again and again, the adjacent pair of symbols
whose concatenation is the highest-scoring piece (score falls with the order in which training
learned the piece; on equal scores the leftmost pair). Hugging Face BPE merges the adjacent pair
with the lowest-ranked merge (on equal ranks the leftmost). So every split of a piece into two
pieces is a merge, ranked by the piece's score: both then pick the same piece at every step. The
one difference: SentencePiece breaks a tie between two *different* splits of the same piece by
position, Hugging Face by rank (here: the shorter left part first). That matters only where two
such splits overlap in one symbol (symbols [a, aa, a]: "a"+"aa" and "aa"+"a" both make "aaa"),
which BPE's own merge order does not produce from plain characters on any text we have tried
(the whole bilingual sample, arbitrary Unicode, random concatenations of pieces: all equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .hf_tokenizer import DATASET_ID_TOKENS_KEY, SOURCE_FINGERPRINT_KEY, import_tokenizers
from .tokenizer_error import TokenizerError


def convert(model_file: Path, *, dataset_id_tokens: Sequence[str], fingerprint: str) -> tuple[Any, dict]:
    """The Hugging Face twin of the SentencePiece model in `model_file`: (a `tokenizers.Tokenizer`,
    the tokenizer_config.json dict: EOS, unk, no BOS, `dataset_id_tokens` and the source
    `fingerprint` under our own keys)."""
    proto = _load_proto(model_file)
    spec = proto.trainer_spec
    controls = [p.piece for p in proto.pieces if p.type == p.CONTROL]
    eos = proto.pieces[spec.eos_id].piece
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos,
        "unk_token": proto.pieces[spec.unk_id].piece,
        "pad_token": None,
        "additional_special_tokens": [p for p in controls if p != eos],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        DATASET_ID_TOKENS_KEY: list(dataset_id_tokens),
        SOURCE_FINGERPRINT_KEY: fingerprint,
    }
    return _build(proto, model_file), config


def _load_proto(model_file: Path) -> Any:
    """The model proto in `model_file`, checked for the settings the conversion reproduces."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = {
        "model_type is not BPE": spec.model_type != spec.BPE,
        "normalisation is not identity": norm.name != "identity" or bool(norm.precompiled_charsmap),
        "add_dummy_prefix": norm.add_dummy_prefix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        "spaces are not escaped": not norm.escape_whitespaces,
        "treat_whitespace_as_suffix": spec.treat_whitespace_as_suffix,
        "user-defined symbols": any(p.type == p.USER_DEFINED for p in proto.pieces),
        "no EOS": spec.eos_id < 0,
    }
    found = [name for name, bad in unsupported.items() if bad]
    if found:
        raise TokenizerError(
            f"{model_file}: cannot convert to a Hugging Face tokenizer with the same ids "
            f"({', '.join(found)}); only tokenizers trained by train_tokenizer are supported"
        )
    return proto


def bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, ranked by the piece's score (highest
    first), then by piece id, then shorter left part first."""
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == p.NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-proto.pieces[i].score, i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build(proto: Any, model_file: Path) -> Any:
    """The `tokenizers.Tokenizer` twin of `proto` (see the module docstring)."""
    lib = import_tokenizers(model_file.parent)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    model = lib.models.BPE(
        vocab=vocab,
        merges=bpe_merges(proto),
        unk_token=proto.pieces[proto.trainer_spec.unk_id].piece,
        byte_fallback=proto.trainer_spec.byte_fallback,
        fuse_unk=True,
    )
    hf = lib.Tokenizer(model)
    hf.pre_tokenizer = lib.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    hf.decoder = lib.decoders.Sequence(
        [lib.decoders.Replace("▁", " "), lib.decoders.ByteFallback(), lib.decoders.Fuse()]
    )
    specials = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
    hf.add_special_tokens([lib.AddedToken(s, special=True, normalized=False) for s in specials])
    moved = [s for s in specials if hf.token_to_id(s) != vocab[s]]
    if moved or hf.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise TokenizerError(f"{model_file}: special pieces {moved} changed ids in conversion (a bug)")
    return hf
