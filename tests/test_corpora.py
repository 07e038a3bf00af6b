"""Corpora: the real bilingual sample, the SWORD/OSIS reader, hf: streaming on local files, files:."""

from __future__ import annotations

import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetting_lib.prep import corpora
from forgetting_lib.prep.corpora import CorpusError, iter_documents, osis_to_text, parse_hf_spec


def test_sample_has_one_document_per_chapter(sample_docs):
    for lang, docs in sample_docs.items():
        assert len(docs) == 1189, lang
        assert all(docs), lang
        assert not any("<" in d or ">" in d for d in docs), f"{lang}: leftover markup"
        print(f"sample:{lang}: {sum(map(len, docs)):,} characters in {len(docs)} chapters")


def test_sample_starts_and_ends_where_the_bible_does(sample_docs):
    en, es = sample_docs["en"], sample_docs["es"]
    assert en[0].startswith("In the beginning God created the heaven and the earth.\n")
    assert es[0].startswith("EN el principio crió Dios los cielos y la tierra.\n")
    assert en[0].count("\n") + 1 == 31  # Genesis 1 has 31 verses, one line each
    assert en[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert es[-1].endswith("Amén.")
    assert "Heb." not in en[0]  # translators' footnotes are dropped with their content


def test_sample_is_read_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / corpora.SAMPLE_CACHE_VERSION / "en.jsonl"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps("cached chapter") + "\n", encoding="utf-8")
    monkeypatch.setattr(corpora, "_fetch_sword_module", lambda *a: pytest.fail("downloaded again"))
    assert list(iter_documents("sample:en", data_dir=tmp_path)) == ["cached chapter"]
    monkeypatch.setenv("FORGETTING_DATA_DIR", str(tmp_path))
    assert corpora.data_dir() == tmp_path
    assert list(iter_documents("sample:en")) == ["cached chapter"]


def test_sample_without_apt_explains_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match=r"hf:.*files:"):
        iter_documents("sample:en", data_dir=tmp_path)


def test_sample_without_package_lists_asks_for_apt_update(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 100, "", "E: Unable to locate package sword-text-kjv")
    monkeypatch.setattr(corpora, "_apt_download", lambda package, cwd: failed)
    monkeypatch.setattr(corpora.os, "geteuid", lambda: 1000)
    with pytest.raises(CorpusError, match="sudo apt-get update"):
        iter_documents("sample:en", data_dir=tmp_path)
    assert not list((tmp_path / corpora.SAMPLE_CACHE_VERSION).glob("*.jsonl"))


def test_unknown_sample_language_and_prefix():
    with pytest.raises(CorpusError, match="sample:en, sample:es"):
        iter_documents("sample:fr")
    with pytest.raises(CorpusError, match="sample:, hf:, files:"):
        iter_documents("c4:en")


def test_osis_to_text_drops_notes_and_tags_without_gluing_words():
    osis = (
        '<w lemma="strong:H0776">earth</w>.<note placement="foot"><reference>1.4</reference>'
        'Heb. between</note> <lb type="x-p"/><l level="1"/>And <transChange type="added">it'
        "</transChange> was &amp; is<lb/>good&#39;s  \n end"
    )
    assert osis_to_text(osis) == "earth. And it was & is good's end"


def _write_rows(tmp_path, texts):
    pq.write_table(pa.table({"text": texts[:3], "id": [1, 2, 3]}), tmp_path / "a.parquet")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        for text in texts[3:]:
            f.write(json.dumps({"body": text, "text": text}) + "\n")


def test_hf_streams_local_parquet_and_json(tmp_path):
    texts = [f"document {i}" for i in range(6)]
    _write_rows(tmp_path, texts)
    spec = f"hf:parquet?data_files={tmp_path}/a.parquet&shuffle_buffer=0"
    assert list(iter_documents(spec)) == texts[:3]
    spec = f"hf:json?data_files={tmp_path}/b.jsonl&text_field=body&shuffle_buffer=0"
    assert list(iter_documents(spec)) == texts[3:]


def test_hf_shuffle_is_a_seeded_permutation(tmp_path):
    # json, not parquet: datasets sleeps 5 s after a parquet stream ends (arrow issue 45214)
    texts = [f"document {i}" for i in range(50)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = f"hf:json?data_files={tmp_path}/a.jsonl&shuffle_buffer=100"
    first, again = list(iter_documents(spec, seed=1)), list(iter_documents(spec, seed=1))
    assert first == again and sorted(first) == sorted(texts) and first != texts
    assert list(iter_documents(spec, seed=2)) != first


def test_hf_spec_errors(tmp_path):
    assert parse_hf_spec("hf:allenai/c4:en?split=validation") == (
        "allenai/c4",
        "en",
        {"split": "validation", "text_field": "text", "data_files": None, "shuffle_buffer": "10000"},
    )
    with pytest.raises(CorpusError, match="unknown option 'splt'.*split"):
        iter_documents("hf:allenai/c4?splt=train")
    with pytest.raises(CorpusError, match="shuffle_buffer"):
        iter_documents("hf:allenai/c4?shuffle_buffer=lots")
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CorpusError, match="text_field"):
        list(iter_documents(f"hf:json?data_files={tmp_path}/a.jsonl"))


def test_files_reads_txt_blocks_jsonl_and_parquet_in_sorted_order(tmp_path):
    (tmp_path / "c.txt").write_text("one\nline two\n\n\n  \nthree\n", encoding="utf-8")
    _write_rows(tmp_path, ["p0", "p1", "p2", "j0", "j1"])
    assert list(iter_documents(f"files:{tmp_path}/*")) == [
        "p0",
        "p1",
        "p2",
        "j0",
        "j1",
        "one\nline two",
        "three",
    ]


def test_files_errors(tmp_path):
    with pytest.raises(CorpusError, match=r"files:.*nothing\*\.txt matches no files"):
        list(iter_documents(f"files:{tmp_path}/nothing*.txt"))
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(CorpusError, match=r"a\.csv.*\.txt"):
        list(iter_documents(f"files:{tmp_path}/a.csv"))
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r"a\.jsonl:1.*'text'"):
        list(iter_documents(f"files:{tmp_path}/a.jsonl"))


def test_files_reads_source_code_and_markup_as_whole_file_documents(tmp_path):
    code = "import os\n\n\ndef f():\n    return 1\n"  # blank lines stay inside the document
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/a.py").write_text(code, encoding="utf-8")
    (tmp_path / "pkg/__init__.py").write_text("")  # no text: no document
    (tmp_path / "pkg/b.sv").write_text("module m;\r\nendmodule\r\n", encoding="utf-8")
    (tmp_path / "pkg/c.md").write_text("# Título\n\nText.", encoding="utf-8")
    assert list(iter_documents(f"files:{tmp_path}/**/*")) == [
        code,
        "module m;\nendmodule\n",
        "# Título\n\nText.",
    ]
    assert list(iter_documents(f"files:{tmp_path}/**/*.py")) == [code]
    (tmp_path / "pkg/bad.rs").write_bytes(b"fn main() {}\n// caf\xe9\n")
    with pytest.raises(CorpusError, match=r"bad\.rs: byte 19 \(line 2\) is not UTF-8"):
        list(iter_documents(f"files:{tmp_path}/pkg/bad.rs"))
    (tmp_path / "pkg/a.pyc").write_bytes(b"\0")
    with pytest.raises(CorpusError, match=r"a\.pyc; supported: .*\.txt.*\.py.*\.tex"):
        list(iter_documents(f"files:{tmp_path}/pkg/*.pyc"))
