"""Hugging Face tokenizer folders (Llama 3, Qwen2, Mistral, ..., and our own exports) behind the
interface the engine uses from the SentencePiece `Tokenizer`, read with the `tokenizers` library.

A Hugging Face folder holds `tokenizer.json` in the `tokenizers` format, `tokenizer_config.json`
(special tokens, maybe `chat_template`), maybe `special_tokens_map.json`, and `config.json`
(`bos_token_id` / `eos_token_id`). Our SentencePiece folders hold a `tokenizer.json` too: the card,
`{"format": "forgetting-tokenizer-v1", ...}`. `is_hf_tokenizer_dir` tells them apart by content.

How an HFTokenizer differs from the SentencePiece one:
- Row-start tokens: a pretrained model has no reserved dataset-id slots, so every dataset's rows
  start with BOS: `dataset_token(i)` is `bos_id` for any i >= 0 (EOS for a model without BOS),
  as the paper prompts a Llama model with BOS alone for self-generated replay. `num_dataset_ids`
  is 0. A folder we exported (`tokenizer.to_hf_tokenizer_json`) lists its dataset-id tokens under
  `forgetting_dataset_id_tokens` in tokenizer_config.json; then those behave as in SentencePiece.
- `encode` adds no special tokens and reads special-token text in its input (the string
  "<|end_of_text|>" in a code file) as ordinary text, as SentencePiece does with control tokens,
  so decode(encode(t)) == t (up to the tokenizer's normaliser, e.g. NFC); `decode` drops special
  tokens. `chat_prompt` is the one place where
  special-token text is parsed.
- `vocab_size` is the tokenizer's (ids 0..vocab_size-1); the model's embedding count may be larger.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from .tokenizer_error import TokenizerError

HF_TOKENIZER_FILE, HF_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE, MODEL_CONFIG_FILE, CHAT_TEMPLATE_FILE = (
    "special_tokens_map.json",
    "config.json",
    "chat_template.jinja",
)
# the files that make a tokenizer in a model folder (config.json is the model's)
HF_TOKENIZER_FILES = (HF_TOKENIZER_FILE, HF_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE)
DATASET_ID_TOKENS_KEY = "forgetting_dataset_id_tokens"  # our exports' dataset-id tokens, in order
SOURCE_FINGERPRINT_KEY = "forgetting_source_fingerprint"  # our exports: the SentencePiece model it came from
CONVERTED_SHA_KEY = "forgetting_tokenizer_sha256"  # ... and the tokenizer.json the conversion wrote


def is_hf_tokenizer_dir(directory: str | Path) -> bool:
    """Whether `directory` is a Hugging Face tokenizer folder: it has tokenizer_config.json, or a
    tokenizer.json in the `tokenizers` format (an object with a "model"; our card has none)."""
    directory = Path(directory)
    if (directory / HF_CONFIG_FILE).is_file():
        return True
    path = directory / HF_TOKENIZER_FILE
    if not path.is_file():
        return False
    if path.stat().st_size > 1 << 20:  # a card is a few KB; a vocabulary is not
        return True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False  # the SentencePiece loader reports the damaged card
    return isinstance(data, dict) and "model" in data


def import_tokenizers(directory: Path) -> Any:
    """The `tokenizers` package (an optional dependency), or an error that says how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(
            f"{directory} is a Hugging Face tokenizer folder, which needs the `tokenizers` "
            "package: pip install -e .[hf]"
        ) from None
    return tokenizers


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise TokenizerError(
            f"{path} is not valid JSON ({err}); re-download or re-export the folder"
        ) from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _token_content(value: Any) -> Any:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _special_token_id(tk: Any, directory: Path, which: str, files: dict[str, dict]) -> int | None:
    """Id of the `which` ("bos"/"eos") token: tokenizer_config.json, else special_tokens_map.json,
    else config.json's `<which>_token_id` (the first one, where it lists several); None if none."""
    key = f"{which}_token"
    for name in (HF_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
        content = _token_content(files[name].get(key))
        if content is None:
            continue
        token_id = tk.token_to_id(content) if isinstance(content, str) else None
        if token_id is None:
            raise TokenizerError(
                f"{directory / name}: {key}={content!r} is not a token of {directory / HF_TOKENIZER_FILE}; "
                "fix the file or re-download the folder"
            )
        return token_id
    value = files[MODEL_CONFIG_FILE].get(f"{key}_id")
    if isinstance(value, list):
        value = value[0] if value else None
    if value is not None and (not isinstance(value, int) or tk.id_to_token(value) is None):
        raise TokenizerError(
            f"{directory / MODEL_CONFIG_FILE}: {key}_id={value!r} is not an id of "
            f"{directory / HF_TOKENIZER_FILE}; fix the file"
        )
    return value


class HFTokenizer:
    """A Hugging Face tokenizer folder: encode/decode plus the ids binarize and data loading need."""

    def __init__(self, directory: Path, tk: Any, files: dict[str, dict], fingerprint: str):
        self.directory, self._tk = directory, tk
        self.config = files[HF_CONFIG_FILE]  # tokenizer_config.json ({} when absent)
        # An export of one of our SentencePiece tokenizers gives its ids exactly (sp_to_hf.py,
        # tests/test_hf_tokenizer.py): it keeps that tokenizer's fingerprint, so token files made
        # with either one serve a model of either form; only while its tokenizer.json is the one
        # the conversion wrote (an edited one is another tokenizer).
        source = self.config.get(SOURCE_FINGERPRINT_KEY)
        converted = source and self.config.get(CONVERTED_SHA_KEY) == fingerprint
        self.fingerprint = str(source) if converted else fingerprint
        self.eos_id = _special_token_id(tk, directory, "eos", files)
        self.bos_id = _special_token_id(tk, directory, "bos", files)
        if self.eos_id is None:
            raise TokenizerError(
                f"tokenizer {directory}: no EOS token in {HF_CONFIG_FILE} (eos_token), "
                f"{SPECIAL_TOKENS_MAP_FILE} or {MODEL_CONFIG_FILE} (eos_token_id); add one of them"
            )
        vocab = tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(tk.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        names = self.config.get(DATASET_ID_TOKENS_KEY, [])
        self._dataset_ids = [vocab.get(name) for name in names]
        if None in self._dataset_ids:
            raise TokenizerError(
                f"{directory / HF_CONFIG_FILE}: {DATASET_ID_TOKENS_KEY} names tokens missing from "
                f"{directory / HF_TOKENIZER_FILE}; re-export the tokenizer"
            )
        # corpus text is text: special-token strings in it are spelled out, not matched
        tk.encode_special_tokens = True
        first = tk.encode("", add_special_tokens=True).ids[:1]  # what it puts before every text
        self._adds_bos = self.bos_id is not None and first == [self.bos_id]

    @classmethod
    def load(cls, directory: str | Path) -> "HFTokenizer":
        """Load the Hugging Face tokenizer folder `directory`."""
        directory = Path(directory)
        path = directory / HF_TOKENIZER_FILE
        if not path.is_file():
            hint = (
                " it holds only a slow SentencePiece tokenizer; save a fast one with transformers: "
                f"AutoTokenizer.from_pretrained('{directory}').save_pretrained('{directory}')"
                if (directory / "tokenizer.model").is_file()
                else " re-download or re-export the folder"
            )
            raise TokenizerError(f"Hugging Face tokenizer folder {directory}: {path} is missing;{hint}")
        tokenizers = import_tokenizers(directory)
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception
            raise TokenizerError(
                f"{path} is not a tokenizer the `tokenizers` library {tokenizers.__version__} can read "
                f"({err}); re-download the folder or upgrade tokenizers"
            ) from None
        names = (HF_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, MODEL_CONFIG_FILE)
        files = {name: _read_json(directory / name) for name in names}
        return cls(directory, tk, files, hashlib.sha256(path.read_bytes()).hexdigest())

    @property
    def num_dataset_ids(self) -> int:
        """How many dataset-id tokens the folder reserves: 0 for a pretrained model's tokenizer
        (every dataset starts its rows with BOS), the exported ones for a folder of ours."""
        return len(self._dataset_ids)

    def dataset_token(self, i: int) -> int:
        """Row-start token of dataset `i`: BOS for any i >= 0 (EOS where there is no BOS), or the
        i-th exported dataset-id token."""
        if i < 0 or (self._dataset_ids and i >= len(self._dataset_ids)):
            last = f"0..{len(self._dataset_ids) - 1}" if self._dataset_ids else "any id >= 0"
            raise IndexError(
                f"dataset id {i} is out of range: tokenizer {self.directory} takes dataset ids {last}"
            )
        if self._dataset_ids:
            return self._dataset_ids[i]
        return self.eos_id if self.bos_id is None else self.bos_id

    def piece(self, token_id: int) -> str:
        """The token string of `token_id` (e.g. `<|begin_of_text|>`, `Ġthe`, `▁the`)."""
        token = self._tk.id_to_token(int(token_id))
        if token is None:
            raise IndexError(
                f"token id {token_id} is outside tokenizer {self.directory} (0..{self.vocab_size - 1})"
            )
        return token

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (in parallel); no BOS/EOS added, special-token text spelled out."""
        try:
            return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]
        except (TypeError, UnicodeEncodeError) as err:  # what tokenizers raises for non-UTF-8-able input
            raise TokenizerError(
                f"cannot encode: {err}; texts must be str of valid Unicode (no "
                "lone surrogates: read files with encoding='utf-8')"
            ) from err

    def encode_one(self, text: str) -> list[int]:
        """Token ids of one text."""
        return self.encode([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens (BOS, EOS, ...) decode to nothing."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._tk.decode(ids, skip_special_tokens=True)

    def decode_rows(self, rows: Iterable[Iterable[int]]) -> list[str]:
        """Text of each row of a [B, T] token array (e.g. sampled or data rows)."""
        return [self.decode(row) for row in rows]

    def pieces(self, text: str) -> list[str]:
        """The token strings `text` is cut into."""
        return [self.piece(i) for i in self.encode_one(text)]

    def chat_prompt(self, messages: Sequence[dict] | None = None) -> list[int]:
        """Token ids of the chat template rendered for `messages` (default: none) with the
        generation prompt: what a chat model sees before it writes an assistant turn. The
        "chat-template prompt" option of self-generated replay.

        Rendered as transformers does (sandboxed jinja2, `raise_exception`, the special-token
        strings), except that a read of a missing message gives an undefined value, not an error,
        so templates that read `messages[0]` (Llama 3.1, Qwen2.5) render their default system
        turn; `strftime_now` is not offered, so dated templates use their fixed default date and
        a prompt is the same every day. Special-token text in the rendering is parsed as tokens,
        and BOS is put first when the tokenizer adds it to every text and the template did not.
        """
        text = _render_chat_template(
            self._chat_template(),
            self.directory,
            messages=list(messages or []),
            add_generation_prompt=True,
            tools=None,
            documents=None,
            **self._special_token_strings(),
        )
        self._tk.encode_special_tokens = False
        try:
            ids = self._tk.encode(text, add_special_tokens=False).ids
        finally:
            self._tk.encode_special_tokens = True
        return [self.bos_id] + ids if self._adds_bos and ids[:1] != [self.bos_id] else ids

    def _chat_template(self) -> str:
        """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of
        named templates: the one named "default")."""
        if (self.directory / CHAT_TEMPLATE_FILE).is_file():
            return (self.directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        template = self.config.get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if not isinstance(template, str):
            raise TokenizerError(
                f"{self.directory / HF_CONFIG_FILE} has no chat_template (and there is no "
                f"{CHAT_TEMPLATE_FILE}): this is not a chat model; prompt with BOS instead"
            )
        return template

    def _special_token_strings(self) -> dict[str, str]:
        """bos_token, eos_token (and any other `*_token` of tokenizer_config.json) as strings."""
        out = {
            key: _token_content(value)
            for key, value in self.config.items()
            if key.endswith("_token") and isinstance(_token_content(value), str)
        }
        for name, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            out[name] = "" if token_id is None else self._tk.id_to_token(token_id)
        return out

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({str(self.directory)!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, fingerprint={self.fingerprint[:12]})"
        )


def _render_chat_template(template: str, directory: Path, **context: Any) -> str:
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError(
            f"rendering the chat template of {directory} needs jinja2: pip install jinja2"
        ) from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=False, indent=indent)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
        undefined=jinja2.ChainableUndefined,
    )
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = tojson
    try:
        return env.from_string(template).render(**context)
    except jinja2.TemplateError as err:
        raise TokenizerError(
            f"the chat template of {directory} fails for {len(context['messages'])} messages: {err}; "
            "pass messages it accepts (e.g. a system message) or fix the template"
        ) from None
