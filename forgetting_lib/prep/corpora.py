"""Corpora: where text comes from. Every corpus is a spec string that yields documents (str).

Specs:
- `sample:en`, `sample:es` — the built-in bilingual sample: the King James Bible (English) and
  the Reina-Valera 1909 Bible (Spanish), public domain, the same content in two languages. One
  document per chapter (1,189 per language, verses joined by "\\n"): chapters are small enough
  to give a shuffled train/valid split hundreds of documents on each side, and large enough to
  carry real context. Fetched once from Debian (`apt-get download sword-text-kjv` /
  `sword-text-sparv`, no root needed), decoded by the small zText reader below, cached as JSONL
  under `data_dir()`. The order is fixed (canonical book order); `seed` is not used.
- `hf:<name>[:<config>][?split=train&text_field=text&data_files=a,b&shuffle_buffer=10000]` —
  Hugging Face `datasets` streaming, shuffled with a buffer (`shuffle_buffer=0` keeps the order).
  (`datasets` pauses 5 s when a parquet stream ends: its workaround for apache/arrow#45214.)
- `files:<glob>` — local files in sorted order: `.txt` (one document per blank-line-separated
  block), `.jsonl` and `.parquet` (one document per row, from the `text` field), and source code
  or markup (`WHOLE_FILE_SUFFIXES`: .py, .c, .rs, .md, .tex, ...; one document per file, as
  written but with LF line ends; files with no text skipped), e.g.
  `files:/usr/lib/python3.11/**/*.py` for a local code corpus; `{python_stdlib}` in the glob
  stands for the running interpreter's standard library folder (`files:{python_stdlib}/*.py`, the
  same corpus on any machine with that Python). Text is UTF-8 (an error names the first byte
  that is not). `seed` unused.
- `synthetic:<old|new>[?seed=..&words=..&...]` — two related generated languages with unlimited
  fresh text and a known entropy rate (`synthetic.py`); `seed` picks the stream.
"""

from __future__ import annotations

import glob as globlib
import html
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import zlib
from itertools import chain
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl

import numpy as np

from . import synthetic

PREFIXES = ("sample:", "hf:", "files:", "synthetic:")
STDLIB_PLACEHOLDER = "{python_stdlib}"  # in a files: glob, the running Python's standard library folder
SAMPLE_PACKAGES = {"en": ("sword-text-kjv", "engKJV2006eb"), "es": ("sword-text-sparv", "spaRV1909eb")}
SAMPLE_CACHE_VERSION = "sample-v1"  # bump when the extraction below changes
HF_KEYS = {"split": "train", "text_field": "text", "data_files": None, "shuffle_buffer": "10000"}
# files: suffixes read as one document per file (source code and markup, whose blank lines are
# part of a document rather than between documents)
WHOLE_FILE_SUFFIXES = (
    *(".py", ".c", ".h", ".cpp", ".rs", ".go", ".java", ".js", ".ts"),
    *(".v", ".sv", ".vh"),  # Verilog / SystemVerilog
    *(".md", ".rst", ".tex"),
)


class CorpusError(ValueError):
    """A corpus spec is malformed or its source is unavailable; the message says how to fix it."""


def data_dir() -> Path:
    """Where downloaded corpora are cached: $FORGETTING_DATA_DIR, else ~/.cache/forgetting_lib."""
    return _default_data_dir()


def _default_data_dir() -> Path:
    env = os.environ.get("FORGETTING_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "forgetting_lib"


def iter_documents(spec: str, *, seed: int = 0, data_dir: Path | None = None) -> Iterator[str]:
    """Yield the documents of corpus `spec` (see the module docstring for the spec forms).

    `seed` drives the shuffle of streaming `hf:` corpora; `data_dir` overrides the cache folder.
    Raises CorpusError for an unknown prefix, a bad spec, or an unavailable source.
    """
    root = Path(data_dir) if data_dir is not None else _default_data_dir()
    if spec.startswith("sample:"):
        return iter(_load_sample(spec.removeprefix("sample:"), root))
    if spec.startswith("hf:"):
        return _iter_hf(spec, seed)
    if spec.startswith("files:"):
        return _iter_files(spec.removeprefix("files:"))
    if spec.startswith("synthetic:"):
        try:
            synthetic.parse_spec(spec)  # a bad spec fails now, not at the first document
        except synthetic.SyntheticSpecError as err:
            raise CorpusError(str(err)) from None
        return synthetic.iter_documents(spec, seed=seed)
    raise CorpusError(
        f"unknown corpus spec {spec!r}: it must start with one of {', '.join(PREFIXES)} "
        "(e.g. sample:en, hf:allenai/c4:en, files:data/*.txt, synthetic:old)"
    )


# ----- sample: the SWORD Bible modules from Debian -----


def _load_sample(lang: str, root: Path) -> list[str]:
    """The chapters of the sample in `lang`, from the JSONL cache (built on first use)."""
    if lang not in SAMPLE_PACKAGES:
        raise CorpusError(
            f"unknown sample language {lang!r}: use one of "
            + ", ".join(f"sample:{k}" for k in SAMPLE_PACKAGES)
        )
    cache = root / SAMPLE_CACHE_VERSION / f"{lang}.jsonl"
    if not cache.exists():
        package, module = SAMPLE_PACKAGES[lang]
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent, prefix="download-") as tmp:
            module_dir = _fetch_sword_module(package, module, Path(tmp))
            chapters = read_sword_chapters(module_dir)
            _write_jsonl_atomic(cache, chapters)
    with open(cache, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _fetch_sword_module(package: str, module: str, tmp: Path) -> Path:
    """Download the Debian package into `tmp`, unpack it, return the zText module folder."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusError(
            "the built-in sample needs apt-get and dpkg-deb (Debian/Ubuntu), which this machine "
            "lacks; use another corpus instead, e.g. --corpus hf:allenai/c4:en (pip install -e "
            ".[hf]) or --corpus 'files:my_texts/*.txt'"
        )
    result = _apt_download(package, tmp)
    if result.returncode != 0 and "Unable to locate package" in result.stderr:
        if os.geteuid() != 0:
            raise CorpusError(
                f"apt has no package lists, so `apt-get download {package}` failed; "
                "run `sudo apt-get update` once and try again"
            )
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, text=True)
        result = _apt_download(package, tmp)
    debs = sorted(tmp.glob("*.deb"))
    if result.returncode != 0 or not debs:
        raise CorpusError(
            f"`apt-get download {package}` failed: {result.stderr.strip()[-500:]}; "
            "check the network/apt sources, or use an hf: or files: corpus instead"
        )
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], check=True)
    module_dir = tmp / "root/usr/share/sword/modules/texts/ztext" / module
    if not module_dir.is_dir():
        raise CorpusError(
            f"package {package} has no SWORD module at {module_dir}; "
            "its layout changed, update SAMPLE_PACKAGES in forgetting_lib/corpora.py"
        )
    _check_versification(tmp / "root/usr/share/sword/mods.d" / f"{module}.conf")
    return module_dir


def _apt_download(package: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", package], cwd=cwd, capture_output=True, text=True)


def _check_versification(conf: Path) -> None:
    """The chapter split relies on the KJV versification (SWORD's default when the key is absent)."""
    if not conf.exists():
        raise CorpusError(
            f"{conf} is missing from the package; update SAMPLE_PACKAGES in forgetting_lib/corpora.py"
        )
    match = re.search(r"^Versification=(\S+)", conf.read_text(encoding="utf-8"), re.M)
    if match and match.group(1) != "KJV":
        raise CorpusError(f"{conf} declares Versification={match.group(1)}; only KJV is supported")


_INDEX_ENTRY = np.dtype([("block", "<u4"), ("offset", "<u4"), ("size", "<u2")])
_BLOCK_TAGS = re.compile(r"</?(?:l|lb|lg|div|title|chapter|milestone|p|q)\b[^>]*>")


def read_sword_entries(module_dir: Path, testament: str) -> list[str]:
    """Raw OSIS text of every index entry of a zText testament ("ot" or "nt"), in order.

    `.bzs`: uint32 (offset, size, uncompressed size) per zlib block in `.bzz`; `.bzv`: per entry
    (block uint32, offset in the uncompressed block uint32, size uint16), 10 bytes. Entries follow
    the versification: module header, testament header, then per book an intro entry and per
    chapter a heading entry before its verses (KJV: 24,115 OT and 8,246 NT entries).
    """
    blocks = np.fromfile(module_dir / f"{testament}.bzs", dtype="<u4").reshape(-1, 3)
    entries = np.fromfile(module_dir / f"{testament}.bzv", dtype=_INDEX_ENTRY)
    packed = (module_dir / f"{testament}.bzz").read_bytes()
    plain = [zlib.decompress(packed[start : start + size]) for start, size, _ in blocks]
    return [plain[b][o : o + s].decode("utf-8") for b, o, s in entries.tolist()]


def osis_to_text(osis: str) -> str:
    """Plain text of an OSIS fragment: notes dropped with their content, tags removed (block
    tags become spaces, inline tags vanish), XML entities unescaped, whitespace collapsed."""
    text = re.sub(r"<note\b[^>]*>.*?</note>", "", osis, flags=re.S)
    text = _BLOCK_TAGS.sub(" ", text)
    text = re.sub(r"<[^>]*>", "", text)
    return " ".join(html.unescape(text).split())


def read_sword_chapters(module_dir: Path) -> list[str]:
    """One document per chapter: verses joined by newlines, book intros dropped.

    Chapter boundaries come from the `<chapter sID=...>` milestone in each chapter's heading
    entry; a `<div type="book" sID=...>` (the book intro entry) ends the previous chapter.
    """
    chapters: list[list[str]] = []
    current: list[str] | None = None
    for testament in ("ot", "nt"):
        for osis in read_sword_entries(module_dir, testament):
            if re.search(r"<div\b[^>]*type=\"book\"[^>]*\bsID=|<div\b[^>]*\bsID=[^>]*type=\"book\"", osis):
                current = None
            if re.search(r"<chapter\b[^>]*\bsID=", osis):
                current = []
                chapters.append(current)
            text = osis_to_text(osis)
            if current is not None and text:
                current.append(text)
    docs = ["\n".join(verses) for verses in chapters]
    if len(docs) != 1189 or not all(docs):
        raise CorpusError(
            f"{module_dir}: found {len(docs)} chapters ({sum(not d for d in docs)} "
            "empty), expected 1,189 non-empty KJV chapters; the module format changed"
        )
    return docs


def _write_jsonl_atomic(path: Path, docs: list[str]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----- hf: Hugging Face datasets streaming -----


def parse_hf_spec(spec: str) -> tuple[str, str | None, dict[str, str | None]]:
    """`hf:name[:config][?k=v&...]` -> (name, config, options with defaults filled in)."""
    body, _, query = spec.removeprefix("hf:").partition("?")
    name, _, config = body.partition(":")
    if not name:
        raise CorpusError(f"corpus spec {spec!r} has no dataset name: use hf:<name>[:<config>]")
    options = dict(HF_KEYS)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in HF_KEYS:
            raise CorpusError(f"corpus spec {spec!r}: unknown option {key!r}; valid: {', '.join(HF_KEYS)}")
        options[key] = value
    try:
        int(options["shuffle_buffer"])
    except ValueError:
        raise CorpusError(f"corpus spec {spec!r}: shuffle_buffer must be an integer") from None
    return name, config or None, options


def _iter_hf(spec: str, seed: int) -> Iterator[str]:
    """Check the spec and the `datasets` import now; stream rows lazily."""
    name, config, options = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"corpus {spec!r} needs Hugging Face datasets: pip install -e .[hf]") from None
    data_files = options["data_files"].split(",") if options["data_files"] else None

    def rows() -> Iterator[str]:
        """The text field of each (shuffled) row."""
        stream = datasets.load_dataset(
            name, config, split=options["split"], streaming=True, data_files=data_files
        )
        buffer = int(options["shuffle_buffer"])
        if buffer > 0:
            stream = stream.shuffle(seed=seed, buffer_size=buffer)
        field = options["text_field"]
        for row in stream:
            if field not in row:
                raise CorpusError(
                    f"corpus {spec!r}: rows have no field {field!r} (fields: "
                    f"{', '.join(row)}); add ?text_field=<one of them>"
                )
            yield row[field]

    return rows()


# ----- files: local .txt / .jsonl / .parquet / whole files -----


def _iter_files(pattern: str) -> Iterator[str]:
    """Check the glob and the file types now; read the files lazily."""
    expanded = os.path.expanduser(pattern.replace(STDLIB_PLACEHOLDER, sysconfig.get_paths()["stdlib"]))
    paths = [Path(p) for p in sorted(globlib.glob(expanded, recursive=True)) if os.path.isfile(p)]
    if not paths:
        raise CorpusError(f"corpus files:{pattern} matches no files; check the glob (quote it in a shell)")
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    readers |= {suffix: _read_whole for suffix in WHOLE_FILE_SUFFIXES}
    for path in paths:
        if path.suffix not in readers:
            raise CorpusError(f"corpus files:{pattern}: cannot read {path}; supported: {', '.join(readers)}")
    return chain.from_iterable(readers[path.suffix](path) for path in paths)


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 is a CorpusError naming where."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError:
        raise CorpusError(_not_utf8(path)) from None


def _not_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 is (offset, line), and how to fix the file."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0  # offset: bytes of whole chunks
    lines = 1
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            held = decoder.getstate()[0]  # the tail of the previous chunk, decoded with this one
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                bad = offset - len(held) + err.start  # err.start counts in held + chunk
                line = lines + (held + chunk)[: err.start].count(b"\n") - held.count(b"\n")
                return (
                    f"{path}: byte {bad:,} (line {line}) is not UTF-8 ({err.reason}); convert the "
                    f"file, e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt, or leave it out of the glob"
                )
            offset += len(chunk)
            lines += chunk.count(b"\n")
    return f"{path}: not UTF-8 text; convert it to UTF-8"


def _read_txt(path: Path) -> Iterator[str]:
    """Documents are blocks of lines separated by one or more blank (whitespace-only) lines."""
    block: list[str] = []
    for line in _lines(path):
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _read_whole(path: Path) -> Iterator[str]:
    """The whole file as one document (line ends read as LF), unless it holds only whitespace."""
    text = "".join(_lines(path))
    if text.strip():
        yield text


def _read_jsonl(path: Path) -> Iterator[str]:
    for number, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{number}: not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CorpusError(f"{path}:{number}: each line must be a JSON object with a string 'text' field")
        yield row["text"]


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if "text" not in table.schema_arrow.names:
        raise CorpusError(f"{path}: no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        yield from batch.column(0).to_pylist()
