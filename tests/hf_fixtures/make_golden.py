"""Golden reference data for the Hugging Face importer/exporter (`forgetting_lib.engine.hf`), made
with PyTorch `transformers`.

PyTorch and `transformers` are NOT dependencies of the project: this script is run by hand in a
separate environment that has them, its outputs are committed as small test fixtures, and CI only
reads those outputs (safetensors, JSON and .npz files). It is not collected by pytest.

Two modes:

    python tests/hf_fixtures/make_golden.py
        (Re)writes every fixture folder next to this file: tiny randomly initialised float32 causal
        LMs of five Llama-family architectures (`llama3`, `qwen2`, `mistral`, `apertus`, `qwen3`),
        each saved with `save_pretrained(..., safe_serialization=True)` (`llama3` sharded), the same
        byte-level BPE tokenizer in every folder (`tokenizer.json`, `tokenizer_config.json` with a
        Llama 3 style chat template), `golden.npz` (tokens, eager float32 logits, a greedy
        continuation from `generate`) and `golden_text.json` (a text and its ids). Deterministic:
        fixed torch and numpy seeds, and a tokenizer trained on a fixed list of files of the running
        interpreter's standard library (its sha256 is printed and stored in `golden_text.json`).

    python tests/hf_fixtures/make_golden.py check-export <hf_folder> <tokens.npy> <logits.npy> [--atol 1e-4]
        Loads <hf_folder> with `AutoModelForCausalLM.from_pretrained` (eager attention, float32),
        runs the [B, T] tokens, prints the loaded class and the max abs difference from the given
        [B, T, V] logits, and exits 1 when it exceeds atol (or the shapes differ, or a value is not
        finite). This checks a folder our exporter wrote against the logits our JAX model produced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    ApertusConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

HERE = Path(__file__).resolve().parent
VOCAB = 384
# The order fixes the ids: pad 0, bos 1, eos 2 (the configs' pad/bos/eos_token_id), then the chat
# template's header and end-of-turn markers.
SPECIAL = [
    "<|pad|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
PAD, BOS, EOS = 0, 1, 2
# Tokenizer training text: files of the running interpreter's standard library (Python 3.11.7 made
# the committed tokenizer; another version may give other merges, see the sha256 in golden_text.json).
STDLIB_FILES = ["textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py", "glob.py"]
# Qwen2's pre-tokenizer split (Llama 3's differs only in \p{N}{1,3}): transformers 5 loads a folder whose
# config.json says model_type "qwen2" with its own Qwen2Tokenizer, which rebuilds the normalizer (NFC)
# and pre-tokenizer from this regex whatever tokenizer.json says; with the same pipeline here, the
# HF ids and those of `tokenizers.Tokenizer.from_file("tokenizer.json")` agree in every folder.
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
# includes a decomposed "e" + combining acute (U+0301), which the NFC normalizer composes
GOLDEN_TEXT = (
    "Hello, world! def forward(self, x):\n    return x * 2  # ünïcödé ✓ 中文 cafe\u0301\n\tTabs  and  spaces."
)
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
]
BATCH, SEQ, PROMPT, NEW = 2, 12, 4, 8

# Shared by every model: sizes, a larger init so logits are not tiny, long enough positions for the
# llama3 rope scaling (factor 32 x original 16 = 512), the tokenizer's special ids.
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    initializer_range=0.1,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
# name -> (seed, config, save_pretrained's max_shard_size or None for one file)
MODELS = {
    "llama3": (
        1,
        lambda: LlamaConfig(
            **COMMON,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=160,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # small, so the scaling changes the frequencies that matter at these lengths
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=True,
        ),
        "200KB",
    ),
    "qwen2": (
        2,
        lambda: Qwen2Config(
            **COMMON,
            num_key_value_heads=2,
            intermediate_size=160,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        ),
        None,
    ),
    "mistral": (
        3,
        lambda: MistralConfig(
            **COMMON,
            num_key_value_heads=4,
            intermediate_size=160,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=None,
            tie_word_embeddings=False,
        ),
        None,
    ),
    "apertus": (
        4,
        # ApertusConfig defaults to llama3 rope scaling (theta 1.2e7) and the xIELU activation: both
        # set explicitly. It has no head_dim field (the model uses hidden_size // num_attention_heads).
        lambda: ApertusConfig(
            **COMMON,
            num_key_value_heads=4,
            intermediate_size=256,
            hidden_act="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        ),
        None,
    ),
    "qwen3": (
        5,
        lambda: Qwen3Config(
            **COMMON,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=160,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        ),
        None,
    ),
}


def train_tokenizer() -> tuple[tokenizers.Tokenizer, str]:
    """A byte-level BPE with VOCAB entries (256 bytes, the SPECIAL tokens, merges) that prepends
    bos when asked for special tokens, as Llama 3's does; also the sha256 of its training text."""
    stdlib = Path(textwrap.__file__).parent
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in STDLIB_FILES]
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL[BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, BOS)]
    )
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in SPECIAL] == list(range(len(SPECIAL)))
    return tok, digest


def write_tokenizer(tok: tokenizers.Tokenizer, folder: Path) -> None:
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL[BOS],
        "eos_token": SPECIAL[EOS],
        "pad_token": SPECIAL[PAD],
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def randomise(model: torch.nn.Module) -> None:
    """Norm gains 1 + 0.1 randn (a missed gain changes the logits); zero biases 0.1 randn."""
    with torch.no_grad():
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        named = [n for n, _ in model.named_parameters() if "norm" in n]
        assert len(norms) == len(named) and norms, (len(norms), named)
        for m in norms:
            m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
        for _, p in model.named_parameters():
            if p.ndim == 1 and not p.any():
                p.copy_(0.1 * torch.randn_like(p))


def load(folder: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def logits_of(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(tokens, dtype=np.int64))).logits
    return out.float().numpy()


def make(name: str, tok: tokenizers.Tokenizer, digest: str) -> None:
    seed, make_config, shard = MODELS[name]
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = make_config()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomise(model)
    model.eval()
    kwargs = {} if shard is None else {"max_shard_size": shard}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    write_tokenizer(tok, folder)

    # golden data from the folder as written (a round trip through from_pretrained)
    tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
    prompt = rng.integers(0, VOCAB, size=(BATCH, PROMPT)).astype(np.int32)
    loaded = load(folder)
    logits = logits_of(loaded, tokens)
    assert np.array_equal(logits, logits_of(model, tokens)), f"{name}: reload changed the logits"
    assert logits.shape == (BATCH, SEQ, VOCAB) and np.isfinite(logits).all()
    rope = config.rope_parameters
    inv_freq = loaded.model.rotary_emb.inv_freq.numpy()
    plain = 1.0 / rope["rope_theta"] ** (np.arange(inv_freq.size) / inv_freq.size)
    scaled = not np.allclose(inv_freq, plain)
    assert scaled == (rope["rope_type"] == "llama3"), f"{name}: rope {rope} scaled {scaled}"
    # No eos at all, so no early stop and nothing masked: min_new_tokens with an eos id would set the
    # eos logit to -inf, and the continuation would no longer be plain argmax.
    loaded.generation_config.eos_token_id = None
    with torch.no_grad():
        out = loaded.generate(
            torch.from_numpy(prompt.astype(np.int64)),
            attention_mask=torch.ones(prompt.shape, dtype=torch.int64),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            use_cache=True,
            pad_token_id=PAD,
        )
    greedy = out.numpy().astype(np.int32)
    assert greedy.shape == (BATCH, PROMPT + NEW), greedy.shape
    # the same continuation by argmax over full (uncached) forwards
    seq = prompt
    for _ in range(NEW):
        nxt = logits_of(loaded, seq)[:, -1].argmax(-1).astype(np.int32)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    assert np.array_equal(seq, greedy), f"{name}: generate {greedy} != argmax loop {seq}"
    np.savez(folder / "golden.npz", tokens=tokens, logits=logits, prompt=prompt, greedy=greedy)

    hf_tok = AutoTokenizer.from_pretrained(folder)
    assert len(hf_tok) == VOCAB, f"{name}: {type(hf_tok).__name__} has {len(hf_tok)} tokens"
    ids = hf_tok.encode(GOLDEN_TEXT, add_special_tokens=False)
    assert ids == tok.encode(GOLDEN_TEXT, add_special_tokens=False).ids, f"{name}: HF ids != tokenizers ids"
    assert hf_tok.decode(ids) == unicodedata.normalize("NFC", GOLDEN_TEXT)
    ids_special = hf_tok.encode(GOLDEN_TEXT)
    assert ids_special == [BOS, *ids], ids_special
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (BOS, EOS, PAD)
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id) == (BOS, EOS)
    rendered = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = hf_tok(rendered, add_special_tokens=False)["input_ids"]
    assert chat_ids[0] == BOS and SPECIAL.index("<|eot_id|>") in chat_ids
    assert chat_ids == tok.encode(rendered, add_special_tokens=False).ids, f"{name}: chat ids differ"
    golden_text = {
        "text": GOLDEN_TEXT,
        "ids": ids,
        "ids_with_special_tokens": ids_special,
        "chat": {"messages": CHAT, "add_generation_prompt": True, "rendered": rendered, "ids": chat_ids},
        "tokenizer_training_text_sha256": digest,
    }
    (folder / "golden_text.json").write_text(json.dumps(golden_text, indent=2, ensure_ascii=False) + "\n")
    print(
        f"{name}: {type(loaded).__name__}, logits std {logits.std():.3f}, "
        f"files {sorted(p.name for p in folder.iterdir())}"
    )


def check_export(folder: str, tokens_path: str, logits_path: str, atol: float) -> int:
    tokens = np.load(tokens_path)
    want = np.load(logits_path)
    model = load(Path(folder))
    print(f"loaded {type(model).__name__} (model_type {model.config.model_type}) from {folder}")
    got = logits_of(model, tokens)
    if got.shape != want.shape:
        print(f"FAIL: logits shape {got.shape} != expected {want.shape}")
        return 1
    diff = float(np.abs(got - want.astype(np.float32)).max())
    print(f"max abs diff {diff:.3g} over logits {got.shape} (atol {atol:g})")
    if not np.isfinite(got).all() or not diff <= atol:
        print("FAIL")
        return 1
    print("OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    check = sub.add_parser("check-export", help="compare a HF folder's logits with given logits")
    check.add_argument("hf_folder")
    check.add_argument("tokens", help=".npy of int token ids [B, T]")
    check.add_argument("logits", help=".npy of float logits [B, T, V]")
    check.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if args.mode == "check-export":
        return check_export(args.hf_folder, args.tokens, args.logits, args.atol)
    versions = {m.__name__: m.__version__ for m in (torch, transformers, tokenizers)}
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    tok, digest = train_tokenizer()
    print(f"tokenizer training text sha256 {digest}")
    for name in MODELS:
        make(name, tok, digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
