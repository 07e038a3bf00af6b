"""Multiple-choice benchmarks: the three schemas load from local fixtures through `datasets`, the
prompts are lm-eval-harness's, malformed specs and rows fail naming what is wrong, the scorer's
log-likelihoods equal a direct forward pass (truncated, packed, batched), accuracy counts right,
and a run with log.mc_evals writes mc_* metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib import config, runs
from forgetting_lib.config import ConfigError, ModelConfig
from forgetting_lib.engine import model as model_lib, train
from forgetting_lib.engine.multiple_choice import Suite, accuracy, encode, make_scorer
from forgetting_lib.prep.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    Question,
    chance,
    load_benchmark,
    parse_benchmarks,
)
from forgetting_lib.prep.binarize import binarize

from tokenfiles import write_token_file

FIXTURES = Path(__file__).parent / "fixtures" / "mc"
SIZES = {"mmlu": 12, "arc": 10, "csqa": 10}


def spec(name: str, folder: Path = FIXTURES) -> str:
    return f"hf:json?data_files={folder}/{name}.jsonl&split=train"


@pytest.fixture(scope="module")
def fixtures() -> dict[str, list[Question]]:
    return {name: load_benchmark(name, spec(name)) for name in SIZES}


class CharTokenizer:
    """One token per character (ids 2..96 for printable ASCII): prompts and choices by hand."""

    def encode_one(self, text: str) -> list[int]:
        return [ord(c) - 30 for c in text]


# ----- questions -----


def test_fixtures_load_in_each_schema(fixtures):
    for name, size in SIZES.items():
        questions = fixtures[name]
        assert len(questions) == size
        assert all(0 <= q.answer < len(q.continuations) for q in questions)
    assert {len(q.continuations) for q in fixtures["mmlu"]} == {4}
    assert {len(q.continuations) for q in fixtures["arc"]} == {3, 4, 5}  # ARC varies
    assert fixtures["arc"][3].answer == 2  # labels "1".."4", answerKey "3"
    assert fixtures["arc"][4].continuations == (" hardness", " luster", " streak")
    assert chance(fixtures["csqa"]) == pytest.approx(0.2)
    assert chance(fixtures["mmlu"]) == pytest.approx(0.25)


def test_prompt_formats(fixtures):
    q = fixtures["mmlu"][3]
    assert q.prompt == (
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
        "Which organelle is the main site of ATP production in eukaryotic cells?\n"
        "A. Ribosome\nB. Golgi apparatus\nC. Lysosome\nD. Mitochondrion\nAnswer:"
    )
    assert q.continuations == (" A", " B", " C", " D") and q.answer == 3
    q = fixtures["csqa"][0]
    assert q.prompt == "Question: Where would you keep milk so that it stays cold?\nAnswer:"
    assert q.continuations[:2] == (" cupboard", " refrigerator") and q.answer == 1
    assert fixtures["arc"][0].prompt.startswith("Question: Which form of energy")


def test_limit_spreads_over_the_split(fixtures):
    kept = load_benchmark("mmlu", spec("mmlu"), limit=4)
    assert kept == [fixtures["mmlu"][i] for i in (0, 3, 6, 9)]
    assert load_benchmark("mmlu", spec("mmlu"), limit=100) == fixtures["mmlu"]


def test_parse_benchmarks():
    assert parse_benchmarks("") == {}
    assert list(parse_benchmarks(BENCHMARKS)) == ["mmlu", "arc", "csqa"]
    both = f"hf:json?data_files={FIXTURES}/a.jsonl,{FIXTURES}/b.jsonl&split=train"
    assert parse_benchmarks(f"arc={both}, csqa={spec('csqa')}") == {"arc": both, "csqa": spec("csqa")}
    for bad, match in [
        ("mmlu", "not name=spec"),
        ("mmlu=", "not name=spec"),
        ("hellaswag=hf:Rowan/hellaswag", "unknown benchmark 'hellaswag'"),
        ("mmlu=files:a.jsonl", "must be hf:"),
        ("mmlu=hf:cais/mmlu?text_field=question", "text_field does not apply"),
        ("arc=hf:a,arc=hf:b", "given twice"),
    ]:
        with pytest.raises(BenchmarkError, match=match):
            parse_benchmarks(bad)


def test_config_validates_mc_evals():
    base = {"stop": {"num_tokens_train": 1000}}
    cfg = config.load(base, [("log.mc_evals", BENCHMARKS), ("log.mc_limit", 100)])
    assert cfg.log.mc_limit == 100
    with pytest.raises(ConfigError, match="log.mc_evals: .*unknown benchmark 'piqa'"):
        config.load(base, [("log.mc_evals", "piqa=hf:ybisk/piqa")])
    with pytest.raises(ConfigError, match="log.mc_evals: 'mmlu' is not name=spec"):
        config.load(base, [("log.mc_evals", "mmlu")])
    with pytest.raises(ConfigError, match="log.mc_limit"):
        config.load(base, [("log.mc_limit", -1)])


def _write_rows(folder: Path, name: str, rows: list[dict]) -> str:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return spec(name, folder)


def test_malformed_rows_fail_naming_the_spec_row_and_field(tmp_path):
    good = {"question": "2 + 2 =", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
    rows = [good, {k: v for k, v in good.items() if k != "subject"}]
    bad = _write_rows(tmp_path, "mmlu", rows)
    with pytest.raises(BenchmarkError, match=re.escape(f"mmlu={bad}, row 1: no field 'subject'")):
        load_benchmark("mmlu", bad)
    bad = _write_rows(tmp_path, "mmlu", [{**good, "answer": 4}])
    with pytest.raises(BenchmarkError, match="field 'answer'=4"):
        load_benchmark("mmlu", bad)
    choices = {"text": ["a", "b"], "label": ["A", "B"]}
    bad = _write_rows(tmp_path, "arc", [{"id": "x", "question": "Q?", "choices": choices, "answerKey": "C"}])
    with pytest.raises(BenchmarkError, match=re.escape("row 0: field 'answerKey'='C' is not one of the")):
        load_benchmark("arc", bad)
    with pytest.raises(BenchmarkError, match="no field 'answerKey'"):  # an MMLU file read as ARC
        load_benchmark("arc", spec("mmlu"))
    with pytest.raises(BenchmarkError, match="cannot read it"):
        load_benchmark("csqa", spec("missing", tmp_path))


# ----- scoring -----


def successor_model(V: int = 128):
    """A fake `hidden`: the next token is the current one + 1 with log-probability
    s - log(e^s + V - 1), any other with -log(e^s + V - 1)."""

    def hidden(params, tokens):
        return params["s"] * jax.nn.one_hot((tokens + 1) % V, V), jnp.eye(V, dtype=jnp.float32)

    return hidden, {"s": jnp.float32(6.0)}, V


def test_argmax_picks_the_likely_choice_and_accuracy_counts():
    hidden, params, V = successor_model()
    tok = CharTokenizer()
    questions = [
        Question("abc", ("x", "d", "q"), 1),  # one token per choice: one packed row
        Question("mno", ("pqr", "pqx", "zzzz"), 0),  # a row per choice
        Question("uvw", ("xyz", "xy!"), 1),  # labelled wrong: the model says 0
    ]
    scorer = make_scorer(hidden, T=16, batch_rows=2)
    suite = Suite(scorer, tok, 1, {"a": questions[:2], "b": questions[2:]})
    hi, lo = 6.0 - np.log(np.exp(6.0) + V - 1), -np.log(np.exp(6.0) + V - 1)
    scores = suite.scores(params)
    np.testing.assert_allclose(scores[0], [lo, hi, lo], rtol=1e-5)
    np.testing.assert_allclose(scores[1, :3], [3 * hi, 2 * hi + lo, 4 * lo], rtol=1e-5)
    assert scores[2, 2] == -np.inf  # the third question has two choices
    out = suite(params)
    assert out == {
        "mc_a": 1.0,
        "mc_a_chance": pytest.approx(1 / 3),
        "mc_b": 0.0,
        "mc_b_chance": 0.5,
        "mc_mean": 0.5,
        "mc_mean_chance": pytest.approx((1 / 3 + 0.5) / 2),
    }
    assert accuracy(scorer, params, tok, 1, questions) == pytest.approx(2 / 3)


def test_rows_keep_the_start_token_and_cut_the_prompt_on_the_left():
    tok = CharTokenizer()
    questions = [Question("abcdefghij", ("klm", "kx"), 0), Question("abcdefghij", (" A", " B"), 1)]
    e = encode(questions, tok, 1, T=6)
    ids = tok.encode_one
    # choice "klm": start, the prompt's last 6 - 3 tokens, "kl"; its tokens scored at positions 3..5
    assert e.tokens[0, : e.lengths[0]].tolist() == [1, *ids("hij"), *ids("kl")]
    assert e.positions[0, :3].tolist() == [3, 4, 5] and e.targets[0, :3].tolist() == ids("klm")
    assert e.tokens[1, : e.lengths[1]].tolist() == [1, *ids("ghij"), *ids("k")]
    # " A" and " B" are two characters here: a row each
    assert e.tokens[2, : e.lengths[2]].tolist() == [1, *ids("ghij"), *ids(" ")]
    with pytest.raises(BenchmarkError, match="more than T=6 tokens"):
        encode([Question("q", ("abcdefg", "b"), 0)], tok, 1, T=6)


def test_scores_equal_a_direct_forward_pass(fixtures):
    """Against log-softmax sums over each full (truncated) prompt + choice, one at a time: MMLU's
    letters are packed, ARC's long prompts cut, rows of two widths in batches with padding."""
    cfg = ModelConfig(D=32, L=2, H=16, V=128, dtype="float32")
    graphdef, params = model_lib.init_model(cfg, key=jax.random.key(0))
    forward = jax.jit(model_lib.make_forward(graphdef))
    T, start, tok = 160, 1, CharTokenizer()
    questions = fixtures["mmlu"][:3] + fixtures["arc"][:3]
    suite = Suite(make_scorer(model_lib.make_hidden(graphdef), T, batch_rows=2), tok, start, {"x": questions})
    assert len(suite.groups) == 2  # widths 128 (ARC) and 160 (MMLU, cut to T)
    suite.compile(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    scores = suite.scores(params)
    for i, q in enumerate(questions):
        prompt = tok.encode_one(q.prompt)
        for j, text in enumerate(q.continuations):
            c = tok.encode_one(text)
            row = [start, *prompt[max(len(prompt) - (T - len(c)), 0) :], *c]  # T + 1 at most
            fed = np.zeros((1, T), np.int32)  # padded on the right (one compiled forward)
            fed[0, : len(row) - 1] = row[:-1]
            logp = jax.nn.log_softmax(forward(params, jnp.asarray(fed))[0], axis=-1)
            expected = sum(float(logp[len(row) - len(c) - 1 + k, t]) for k, t in enumerate(c))
            assert scores[i, j] == pytest.approx(expected, rel=1e-4, abs=1e-4), (i, j)


# ----- in a run -----


def _mc_evals() -> str:
    return ",".join(f"{name}={spec(name)}" for name in SIZES)


def test_run_with_mc_evals_writes_mc_metrics(small_tokenizer, tmp_path):
    text = tmp_path / "text" / "qa.txt"
    text.parent.mkdir()
    files = [FIXTURES / f"{name}.jsonl" for name in SIZES]
    questions = [json.loads(line)["question"] for f in files for line in f.read_text().splitlines()]
    text.write_text("\n\n".join(questions * 4) + "\n", encoding="utf-8")
    data = tmp_path / "qa.bin"
    binarize(f"files:{text}", small_tokenizer, data, dataset_id=0)
    T, B = 64, 4
    cfg = config.load(
        {
            "data": {"path": str(data), "T": T, "batch_size": B, "valid_tokens": 4 * T, "eval_batch_size": 4},
            "model": {"D": 32, "L": 1, "H": 16, "V": small_tokenizer.vocab_size, "dtype": "float32"},
            "opt": {"lr": 1e-2, "warmup_tokens": 0},
            "stop": {"num_tokens_train": 4 * B * T},
            "log": {"every_tokens": 2 * B * T, "progress": False, "mc_evals": _mc_evals(), "mc_limit": 5},
        }
    )
    result = train.train_and_evaluate(cfg, tmp_path / "run")
    assert result.status == "finished"
    rows = runs.read_metrics(result.out_dir)
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        for name in SIZES:
            assert row[f"mc_{name}"] in {k / 5 for k in range(6)}  # 5 questions each
        assert row["mc_mean"] == pytest.approx(np.mean([row[f"mc_{n}"] for n in SIZES]))
        assert row["mc_mmlu_chance"] == 0.25 and row["mc_csqa_chance"] == pytest.approx(0.2)
        assert 0 <= row["valid_acc"] <= 1
    df = runs.load_runs(result.out_dir)
    assert {"mc_mean", "mc_arc", "valid_acc"} <= set(df.columns) and df["mc_mean"].notna().all()


def test_mc_evals_without_a_tokenizer_is_refused_before_the_run(tmp_path):
    data = write_token_file(tmp_path / "synthetic.bin", 64 * 16, vocab_size=64)
    cfg = config.load(
        {
            "data": {"path": str(data), "T": 16, "batch_size": 4, "valid_tokens": 64},
            "model": {"D": 32, "L": 1, "H": 16, "V": 64, "dtype": "float32"},
            "stop": {"num_tokens_train": 256},
            "log": {"progress": False, "mc_evals": _mc_evals()},
        }
    )
    with pytest.raises(BenchmarkError, match=r"log.mc_evals: .*synthetic.bin records no tokenizer_dir"):
        train.train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
