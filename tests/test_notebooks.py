"""The numbered notebooks: committed clean, and each runs end to end through the papermill runner.

The walkthrough 01 -> 04 runs once per session at a tiny scale (a 320-piece tokenizer on a few
generated documents, a few thousand tokens, a D=32 model trained for a few steps) in a temporary
project folder, with relative paths and each kernel started in its `notebooks/` folder, as
JupyterLab starts them; each test then checks what one notebook left behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
from pathlib import Path

import nbformat
import pytest

from forgetting_lib import runs
from forgetting_lib.experiments import notebooks
from forgetting_lib.experiments.notebooks import NotebookError, parameters_of, run_notebook

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
T, B = 32, 8
TINY_MODEL = {"D": 32, "L": 1, "H": 16, "V": 320, "dtype": "float32"}
TINY_DATA = {"T": T, "batch_size": B, "valid_tokens": 4 * T, "microbatch_rows": B}

WORDS = {
    "en": "the lord said unto him and they went into the city of david where his people dwelt "
    "in the land of egypt for many days and nights".split(),
    "es": "el señor le dijo y fueron a la ciudad de david donde su pueblo habitaba en la tierra "
    "de egipto por muchos días y noches".split(),
}


def _write_corpus(folder: Path, lang: str, docs: int = 40) -> str:
    """A `files:` corpus of `docs` pseudo-random documents (blank-line separated), named
    relative to the project root `folder`."""
    rng = random.Random(lang)
    text = "\n\n".join(
        " ".join(rng.choice(WORDS[lang]) for _ in range(rng.randint(30, 90))) + "." for _ in range(docs)
    )
    (folder / "corpus").mkdir(exist_ok=True)
    (folder / "corpus" / f"{lang}.txt").write_text(text + "\n", encoding="utf-8")
    return f"files:corpus/{lang}.txt"


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send this process's fd 2 (which the kernels inherit) to `path` for the block."""
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> dict:
    """Run 01..04 with tiny parameters in the project folder `base`, kernels started in
    `base/notebooks`, every path in the parameters relative; returns the folders (absolute),
    each executed notebook and what the kernels wrote to stderr."""
    base = tmp_path_factory.mktemp("walkthrough")
    (base / "notebooks").mkdir()
    corpora = {lang: _write_corpus(base, lang) for lang in ("en", "es")}
    paths = {
        "tok": base / "tokenizer",
        "data": base / "data",
        "runs": base / "runs",
        "figures": base / "figures",
        "executed": base / "executed",
    }
    params = {
        "01_tokenizer": {
            "corpora": corpora,
            "tokenizer_dir": str(paths["tok"]),
            "vocab_size": 320,
            "chars_per_corpus": 20_000,
            "stats_documents": 10,
            "examples": ["the lord said", "el señor dijo"],
            "figures_dir": str(paths["figures"]),
        },
        "02_binarize": {
            "corpora": corpora,
            "dataset_ids": {"en": 0, "es": 1},
            "tokenizer_dir": str(paths["tok"]),
            "data_dir": str(paths["data"]),
            "max_tokens": 4000,
            "T": T,
            "show_rows": 2,
            "figures_dir": str(paths["figures"]),
        },
        "03_pretrain": {
            "run_config": {
                "run": {"name": "tiny_en"},
                "data": TINY_DATA,
                "model": TINY_MODEL,
                "opt": {"lr": 3e-3, "warmup_tokens": 0},
                "stop": {"num_tokens_train": 4 * B * T},
                "log": {"every_tokens": 2 * B * T},
            },
            "data_path": str(paths["data"] / "en.bin"),
            "run_dir": str(paths["runs"] / "pretrain_en"),
            "figures_dir": str(paths["figures"]),
        },
        "04_finetune_replay": {
            "run_config": {
                "run": {"name": "tiny_es"},
                "data": TINY_DATA,
                "opt": {"lr": 3e-3, "warmup_tokens": 0},
                "reg": {"coeff": 1.0, "replay_batch_size": 4, "buffer": 2},
                "stop": {"num_tokens_train": 2 * B * T},
                "log": {"every_tokens": B * T},
            },
            "parent_dir": str(paths["runs"] / "pretrain_en"),
            "data_path": str(paths["data"] / "es.bin"),
            "runs_dir": str(paths["runs"]),
            "tokenizer_dir": str(paths["tok"]),
            "num_samples": 2,
            "figures_dir": str(paths["figures"]),
        },
    }
    params = json.loads(json.dumps(params).replace(f'"{base}/', '"').replace(f'"{base}"', '"."'))
    assert str(base) not in json.dumps(params)  # every path is relative
    stderr = Path(tempfile.mkstemp(suffix=".log")[1])
    with _stderr_to(stderr):
        executed = {
            name: run_notebook(name, params[name], paths["executed"], cwd=base / "notebooks")
            for name in notebooks.WALKTHROUGH
        }
    return {**paths, "notebooks": executed, "params": params, "stderr": stderr.read_text()}


def _code_outputs(path: Path) -> str:
    """Every output of an executed notebook as one string (text, HTML and plotly JSON)."""
    book = nbformat.read(path, as_version=4)
    return json.dumps([c.get("outputs", []) for c in book.cells if c.cell_type == "code"])


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_notebook_is_clean(path):
    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{path.name} is committed with outputs: clear them (Edit > Clear Outputs of All Cells)"
    )
    assert "parameters" in code[0].metadata.get("tags", []), (
        f"{path.name}: its first code cell must be tagged `parameters`"
    )
    parameters_of(path)  # plain `name = literal` lines only


def test_walkthrough_notebooks_exist():
    assert {p.stem for p in COMMITTED} >= set(notebooks.WALKTHROUGH)


def test_01_tokenizer(walkthrough):
    card = json.loads((walkthrough["tok"] / "tokenizer.json").read_text())
    assert card["vocab_size"] == 320 and len(card["corpora"]) == 2
    assert (walkthrough["figures"] / "tokenizer_compression.html").is_file()
    out = _code_outputs(walkthrough["notebooks"]["01_tokenizer"])
    assert "tokens_per_word" in out and "application/vnd.plotly.v1+json" in out


def test_02_binarize(walkthrough):
    for lang, dataset_id in (("en", 0), ("es", 1)):
        side = json.loads((walkthrough["data"] / f"{lang}.json").read_text())
        assert side["dataset_id"] == dataset_id and 0 < side["num_tokens"] <= 4000
        assert (walkthrough["data"] / f"{lang}.bin").stat().st_size == 2 * side["num_tokens"]
    out = _code_outputs(walkthrough["notebooks"]["02_binarize"])
    assert "&lt;ds0&gt;" in out or "<ds0>" in out  # the row table shows the dataset-id token


def test_03_pretrain(walkthrough):
    run_dir = walkthrough["runs"] / "pretrain_en"
    summary = runs.read_summary(run_dir)
    assert summary["status"] == "finished" and summary["tokens"] == 4 * B * T
    df = runs.load_runs(run_dir)
    assert df["valid_ntp"].map(math.isfinite).all() and df["valid_ntp_h2"].notna().all()
    assert df["valid_ntp"].iloc[-1] < df["valid_ntp"].iloc[0]
    assert (walkthrough["figures"] / "pretrain_loss.html").is_file()


def test_04_finetune_replay(walkthrough):
    folders = [walkthrough["runs"] / f"finetune_es_{m}" for m in ("standard", "kl_self", "kl_real")]
    table = runs.final_table(folders)
    assert list(table.index) == [f.name for f in folders]
    assert (table["status"] == "finished").all()
    assert table["forgetting"].map(math.isfinite).all()
    assert (walkthrough["figures"] / "finetune_tradeoff.html").is_file()
    out = _code_outputs(walkthrough["notebooks"]["04_finetune_replay"])
    assert "self_generated" in out and "forgetting" in out


def test_kernels_print_no_warnings_or_errors(walkthrough):
    # ipykernel warns about TCP without encryption unless the kernel uses IPC; a kernel shut
    # down while busy logs a KeyboardInterrupt: a newcomer reads either as a failure
    assert "WARNING" not in walkthrough["stderr"] and "ERROR" not in walkthrough["stderr"]
    assert "KeyboardInterrupt" not in walkthrough["stderr"], walkthrough["stderr"][-2000:]


def test_quickstart_ends_with_the_finetunes_table(walkthrough, tmp_path, monkeypatch):
    from forgetting_lib.experiments.quickstart import result_table

    (tmp_path / "04_finetune_replay.yaml").write_text(json.dumps(walkthrough["params"]["04_finetune_replay"]))
    monkeypatch.chdir(walkthrough["tok"].parent)  # the parameters' paths are relative to the project
    table = result_table(tmp_path)
    assert list(table.index) == [f"finetune_es_{m}" for m in ("standard", "kl_self", "kl_real")]
    assert table["forgetting"].map(math.isfinite).all()


def test_executed_notebooks_keep_figures_and_plain_progress(walkthrough):
    for name in ("01_tokenizer", "03_pretrain", "04_finetune_replay"):
        out = _code_outputs(walkthrough["notebooks"][name])
        assert "application/vnd.plotly.v1+json" in out, name  # drawn by JupyterLab offline
        assert 'src=\\"https://cdn.plot.ly' not in out, name  # the HTML fallback embeds plotly.js
        assert "widget-view+json" not in out, name  # FORGETTING_PLAIN_PROGRESS: no tqdm widget


def test_failing_notebook_names_notebook_and_cell(tmp_path):
    with pytest.raises(NotebookError, match=r"03_pretrain.ipynb failed in code cell .*train_and_evaluate"):
        run_notebook(
            "03_pretrain",
            {
                "run_config": {"data": TINY_DATA, "model": TINY_MODEL, "stop": {"num_tokens_train": B * T}},
                "data_path": str(tmp_path / "missing.bin"),
                "run_dir": str(tmp_path / "run"),
                "figures_dir": str(tmp_path),
            },
            tmp_path / "executed",
            cwd=tmp_path,
        )
    assert (tmp_path / "executed" / "03_pretrain.ipynb").is_file()


def test_unknown_parameter_is_an_error(tmp_path):
    with pytest.raises(NotebookError, match="unknown parameter.*vocab_sise"):
        run_notebook("01_tokenizer", {"vocab_sise": 10}, tmp_path)


def test_notebooks_are_found_by_name_including_figures():
    assert notebooks.notebook_path("03_pretrain") == ROOT / "notebooks" / "03_pretrain.ipynb"
    assert notebooks.notebook_path("figures/high_lr") == ROOT / "notebooks" / "figures" / "high_lr.ipynb"
    with pytest.raises(notebooks.NotebookError, match=r"does not exist \(names: .*figures/method_comp"):
        notebooks.notebook_path("figures/no_such")


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_papermill_sees_every_parameter(path):
    """papermill's own parser (`papermill --help-notebook`) must read every parameter line."""
    import papermill

    assert list(papermill.inspect_notebook(str(path))) == list(parameters_of(path))
