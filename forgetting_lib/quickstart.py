"""The main job on the built-in sample: the numbered notebooks 01-04, run by papermill.

`run()` executes notebooks/01_tokenizer .. 04_finetune_replay with `params/quick/<name>.yaml`
(tokenizer -> token files -> pretraining -> finetuning on Spanish three ways) and writes the
executed notebooks to `<out>/notebooks/`; the artefacts go where the parameter files say
(`outputs/quickstart/...` for the quick ones). Every step skips work that is already complete (a
finished run is not retrained, an existing tokenizer and token files made with it are reused), so
rerunning after an interruption continues. The helpers below are what the notebooks call.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import config as config_lib
from .binarize import binarize_or_reuse
from .tokenizer import train_or_load

SAMPLE = {"en": ("sample:en", 0), "es": ("sample:es", 1)}  # language -> (corpus, dataset id)
# The three finetuning runs of the quickstart: plain, self-generated KL replay, real KL replay.
FINETUNES = {"plain": {"reg.method": "none"},
             "kl_self": {"reg.method": "kl_pre", "reg.synth": True},
             "kl_real": {"reg.method": "kl_pre", "reg.synth": False}}


def prepare_sample(out: str | Path, *, vocab_size: int = 4096,
                   chars_per_corpus: int = 2_000_000) -> dict[str, Any]:
    """Tokenizer on both sample languages, then one token file per language (reused if present).

    Returns {"tokenizer": Tokenizer, "en": sidecar, "es": sidecar, "paths": {lang: Path}}.
    """
    out = Path(out)
    tok = train_or_load([corpus for corpus, _ in SAMPLE.values()], out / "tokenizer",
                        vocab_size=vocab_size, chars_per_corpus=chars_per_corpus)
    result: dict[str, Any] = {"tokenizer": tok, "paths": {}}
    for lang, (corpus, dataset_id) in SAMPLE.items():
        path = out / "data" / f"{lang}.bin"
        result[lang] = binarize_or_reuse(corpus, tok, path, dataset_id=dataset_id)
        result["paths"][lang] = path
    return result


def describe_sample(prepared: dict[str, Any]) -> str:
    """A small table: documents, tokens and the dataset-id token of each language's token file."""
    lines = [f"tokenizer: {prepared['tokenizer'].directory} (vocab {prepared['tokenizer'].vocab_size})",
             f"{'lang':<5} {'documents':>10} {'tokens':>11} {'id token':>9}  file"]
    for lang in SAMPLE:
        s = prepared[lang]
        lines.append(f"{lang:<5} {s['num_documents']:>10,} {s['num_tokens']:>11,} "
                     f"{s['dataset_token']:>9}  {prepared['paths'][lang]}")
    return "\n".join(lines)


def finetune_all(run_config: str | Path | Mapping[str, Any], parent_dir: str | Path,
                 data_path: str | Path, runs_dir: str | Path, *,
                 methods: Mapping[str, Mapping[str, Any]] = FINETUNES,
                 overrides: Mapping[str, Any] | None = None, prefix: str = "finetune_es_",
                 resume: bool = True) -> dict[str, Any]:
    """Finetune `parent_dir` on `data_path` once per method (name -> {dotted key: value}, applied
    after `overrides`), each in `runs_dir/<prefix><name>`; returns {name: RunResult}. Finished runs
    are returned as they are."""
    from .train import train_and_evaluate

    results = {}
    for name, method in methods.items():
        cfg = config_lib.load(run_config, [("model.load_path", str(parent_dir)), ("data.path", str(data_path)),
                                           *(overrides or {}).items(), *method.items()])
        results[name] = train_and_evaluate(cfg, Path(runs_dir) / f"{prefix}{name}", resume=resume)
    return results


def run(out: str | Path = "outputs/quickstart", params_dir: str | Path = "params/quick",
        names: Sequence[str] | None = None) -> list[Path]:
    """Execute the walkthrough notebooks (all of 01-04, or `names`) with
    `<params_dir>/<name>.yaml`; executed copies go to `<out>/notebooks/`. Returns their paths."""
    from .notebooks import WALKTHROUGH, run_notebook

    executed, start = [], time.perf_counter()
    for name in names or WALKTHROUGH:
        t0 = time.perf_counter()
        print(f"== {name} ({Path(params_dir) / f'{name}.yaml'})", flush=True)
        executed.append(run_notebook(name, Path(params_dir) / f"{name}.yaml", Path(out) / "notebooks",
                                     stream_output=True))
        print(f"== {name}: done in {time.perf_counter() - t0:.0f} s -> {executed[-1]}", flush=True)
    print(f"quickstart: {len(executed)} notebooks in {time.perf_counter() - start:.0f} s; figures "
          f"in {Path(out) / 'figures'}", flush=True)
    return executed


def describe_finetunes(results: dict[str, Any]) -> str:
    """Final Spanish loss, English forgetting and train time of each finetuning run."""
    lines = [f"{'finetune':<9} {'stop':<16} {'tokens':>9} {'es loss':>8} {'en loss':>8} "
             f"{'forgetting':>10} {'train s':>8}"]
    for name, r in results.items():
        f = r.final
        lines.append(f"{name:<9} {r.stop_reason:<16} {r.tokens:>9,} {f['valid_ntp']:>8.3f} "
                     f"{f['prev_ntp']:>8.3f} {f['forgetting']:>10.3f} {f['train_time_s']:>8.1f}")
    return "\n".join(lines)
