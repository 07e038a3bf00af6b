"""Multiple-choice benchmarks as text: MMLU, ARC-Challenge and CommonsenseQA questions.

Each benchmark row becomes a `Question`: a prompt, one continuation per choice, the answer's
index. engine/multiple_choice.py scores them by log-likelihood. Benchmarks, by name (the name
picks the prompt format; `BENCHMARKS` gives the paper's sources):
- `mmlu` (`cais/mmlu`, config `all`, split `test`; row: question, subject, choices [4 str],
  answer 0-3). Prompt, continuations " A", " B", " C", " D" (lm-eval-harness's MMLU):
      The following are multiple choice questions (with answers) about {subject, _ as spaces}.

      {question}
      A. {choice 0}
      B. {choice 1}
      C. {choice 2}
      D. {choice 3}
      Answer:
- `arc` (`allenai/ai2_arc`, config `ARC-Challenge`, split `test`) and `csqa`
  (`tau/commonsense_qa`, split `validation`: its test split has no answers); row: question,
  choices {"text": [...], "label": [...]}, answerKey (one of the labels: "A".."E" or "1".."4").
  Prompt "Question: {question}\nAnswer:", continuations " {choice text}".

A spec is an `hf:` corpus spec (corpora.py) read with Hugging Face `datasets` in streaming mode,
as corpora are: `hf:<dataset>[:<config>][?split=..&data_files=..]`, e.g.
`hf:cais/mmlu:all?split=test`, or local files in the same schema,
`hf:json?data_files=mmlu.jsonl&split=train`. Without `split` a benchmark reads its own default
split. `limit` keeps that many questions spread evenly over the split (MMLU is sorted by
subject: its first rows are all abstract algebra).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import parse_qsl

import numpy as np

from .corpora import CorpusError, parse_hf_spec

BENCHMARKS = (
    "mmlu=hf:cais/mmlu:all?split=test,"
    "arc=hf:allenai/ai2_arc:ARC-Challenge?split=test,"
    "csqa=hf:tau/commonsense_qa?split=validation"
)
DEFAULT_SPLITS = {"mmlu": "test", "arc": "test", "csqa": "validation"}
LETTERS = "ABCDEFGHIJ"
_PAIR_START = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")  # a comma that starts the next name=spec


class BenchmarkError(ValueError):
    """A benchmark spec or row is malformed, or its data cannot be read; the message names it."""


@dataclass(frozen=True)
class Question:
    prompt: str
    continuations: tuple[str, ...]  # one per choice, each appended to the prompt
    answer: int  # index of the right continuation


def parse_benchmarks(text: str) -> dict[str, str]:
    """`log.mc_evals` ("mmlu=hf:cais/mmlu:all?split=test,arc=hf:...") -> {name: spec}; "" -> {}.

    A comma separates pairs only where `name=` follows it, so a spec keeps its own commas
    (`data_files=a.jsonl,b.jsonl`)."""
    out: dict[str, str] = {}
    for item in (x.strip() for x in _PAIR_START.split(text.strip())):
        if not item:
            continue
        name, eq, spec = (x.strip() for x in item.partition("="))
        if not eq or not spec:
            raise BenchmarkError(f"{item!r} is not name=spec, e.g. mmlu=hf:cais/mmlu:all?split=test")
        _format(name)
        if name in out:
            raise BenchmarkError(f"benchmark {name!r} is given twice")
        _parse_spec(spec)
        out[name] = spec
    return out


def load_benchmark(name: str, spec: str, limit: int | None = None) -> list[Question]:
    """The questions of benchmark `name` (mmlu, arc, csqa) read from `spec` (see the module
    docstring); `limit` (None or 0: all) keeps that many, spread evenly over the split. Errors
    name the spec (and the row and field of a malformed row)."""
    fmt = _format(name)
    dataset, config, split, data_files = _parse_spec(spec, DEFAULT_SPLITS[name])
    try:
        import datasets
    except ImportError:
        raise BenchmarkError(
            f"benchmark {name}={spec} needs Hugging Face datasets: pip install -e .[hf]"
        ) from None
    try:
        stream = datasets.load_dataset(dataset, config, split=split, streaming=True, data_files=data_files)
        rows = list(stream)
    except Exception as err:  # the hub or the files: any failure to read names the spec
        raise BenchmarkError(
            f"benchmark {name}={spec}: cannot read it ({type(err).__name__}: {err})"
        ) from err
    if not rows:
        raise BenchmarkError(f"benchmark {name}={spec}: the split {split!r} holds no rows")
    keep = (
        range(len(rows))
        if not limit or limit >= len(rows)
        else (i * len(rows) // limit for i in range(limit))
    )
    return [fmt(rows[i], f"benchmark {name}={spec}, row {i}") for i in keep]


def chance(questions: Sequence[Question]) -> float:
    """The accuracy of guessing uniformly: mean of 1 / (number of choices)."""
    return float(np.mean([1 / len(q.continuations) for q in questions]))


def _format(name: str) -> Callable[[Mapping[str, Any], str], Question]:
    formats = {"mmlu": _mmlu, "arc": _labelled, "csqa": _labelled}
    if name not in formats:
        raise BenchmarkError(f"unknown benchmark {name!r}: the formats are {', '.join(formats)}")
    return formats[name]


def _parse_spec(spec: str, default_split: str = "") -> tuple[str, str | None, str, list[str] | None]:
    """(dataset, config, split, data_files) of an `hf:` spec; `split` defaults to `default_split`."""
    if not spec.startswith("hf:"):
        raise BenchmarkError(
            f"benchmark spec {spec!r} must be hf:<dataset>[:<config>][?split=..&data_files=..]"
        )
    given = {k for k, _ in parse_qsl(spec.partition("?")[2], keep_blank_values=True)}
    extra = given - {"split", "data_files"}
    try:
        name, config, options = parse_hf_spec(spec)
    except CorpusError as err:
        raise BenchmarkError(str(err)) from None
    if extra:
        raise BenchmarkError(
            f"benchmark spec {spec!r}: {', '.join(sorted(extra))} does not apply to a benchmark"
        )
    files = options["data_files"].split(",") if options["data_files"] else None
    return name, config, str(options["split"]) if "split" in given else default_split, files


def _field(row: Mapping[str, Any], key: str, where: str) -> Any:
    """row[key], which must be there and not null (a json file's missing keys read as null)."""
    if row.get(key) is None:
        present = ", ".join(k for k, v in row.items() if v is not None)
        raise BenchmarkError(f"{where}: no field {key!r} (its fields: {present})")
    return row[key]


def _mmlu(row: Mapping[str, Any], where: str) -> Question:
    question, subject, choices = (_field(row, k, where) for k in ("question", "subject", "choices"))
    answer = _field(row, "answer", where)
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise BenchmarkError(f"{where}: field 'choices' must be a list of 2 to {len(LETTERS)} texts")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise BenchmarkError(f"{where}: field 'answer'={answer!r} is not an index into its choices")
    letters = LETTERS[: len(choices)]
    lines = [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    prompt = (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        + "\n".join([question.strip(), *lines, "Answer:"])
    )
    return Question(prompt, tuple(f" {letter}" for letter in letters), answer)


def _labelled(row: Mapping[str, Any], where: str) -> Question:
    """ARC and CommonsenseQA: choices {"text": [...], "label": [...]} and the answer's label."""
    question, choices, key = (_field(row, k, where) for k in ("question", "choices", "answerKey"))
    if not isinstance(choices, Mapping):
        raise BenchmarkError(f"{where}: field 'choices' must be {{'text': [...], 'label': [...]}}")
    texts, labels = (_field(choices, k, f"{where}, field 'choices'") for k in ("text", "label"))
    if len(texts) != len(labels) or len(texts) < 2 or str(key) not in labels:
        raise BenchmarkError(f"{where}: field 'answerKey'={key!r} is not one of the labels {list(labels)}")
    return Question(f"Question: {question}\nAnswer:", tuple(f" {t}" for t in texts), labels.index(str(key)))
