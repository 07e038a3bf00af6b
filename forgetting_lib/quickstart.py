"""The main job on the built-in sample: tokenizer -> token files -> pretraining -> loss curve.

Every step skips work that is already complete (a finished run is not retrained, an existing
tokenizer and token files made with it are reused), so rerunning after an interruption continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import config as config_lib, plots, runs
from .binarize import TokenFileError, binarize, read_token_file
from .tokenizer import Tokenizer, TokenizerError, train_tokenizer

SAMPLE = {"en": ("sample:en", 0), "es": ("sample:es", 1)}  # language -> (corpus, dataset id)
# The three finetuning runs of the quickstart: plain, self-generated KL replay, real KL replay.
FINETUNES = {"plain": ["reg.method=none"],
             "kl_self": ["reg.method=kl_pre", "reg.synth=true"],
             "kl_real": ["reg.method=kl_pre", "reg.synth=false"]}


def prepare_sample(out: str | Path, *, vocab_size: int = 4096,
                   chars_per_corpus: int = 2_000_000) -> dict[str, Any]:
    """Tokenizer on both sample languages, then one token file per language (reused if present).

    Returns {"tokenizer": Tokenizer, "en": sidecar, "es": sidecar, "paths": {lang: Path}}.
    """
    out = Path(out)
    corpora = [corpus for corpus, _ in SAMPLE.values()]
    try:
        tok = Tokenizer.load(out / "tokenizer")
        if tok.card["corpora"] != corpora or tok.vocab_size != vocab_size:
            raise TokenizerError("different settings")
    except TokenizerError:
        tok = train_tokenizer(corpora, out / "tokenizer", vocab_size=vocab_size,
                              chars_per_corpus=chars_per_corpus)
    result: dict[str, Any] = {"tokenizer": tok, "paths": {}}
    for lang, (corpus, dataset_id) in SAMPLE.items():
        path = out / "data" / f"{lang}.bin"
        try:
            _, sidecar = read_token_file(path, expected_fingerprint=tok.fingerprint)
        except TokenFileError:
            sidecar = binarize(corpus, tok, path, dataset_id=dataset_id)
        result[lang], result["paths"][lang] = sidecar, path
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


def run(out: str | Path = "outputs/quickstart", params: str | Path = "params/quick/pretrain.yaml",
        overrides: list[str] | None = None,
        finetune_params: str | Path | None = "params/quick/finetune.yaml") -> dict[str, Any]:
    """Prepare the sample, pretrain on English, then finetune on Spanish three ways (plain,
    self-generated KL replay, real KL replay) and plot Spanish loss against English loss."""
    from .train import train_and_evaluate

    out = Path(out)
    prepared = prepare_sample(out)
    print(describe_sample(prepared), flush=True)
    cfg = config_lib.load(params, [f"data.path={prepared['paths']['en']}", *(overrides or [])])
    pretrain = train_and_evaluate(cfg, out / "runs" / cfg.run.name, resume=True)
    figures = plots.save(plots.loss_curves(runs.load_runs(pretrain.out_dir),
                                           title="Pretraining on the English sample"),
                         out / "figures" / "pretrain_loss.html")
    print(f"pretrain: {pretrain.status} ({pretrain.stop_reason}) after {pretrain.tokens:,} tokens; "
          f"English valid loss {pretrain.final['valid_ntp']:.3f} nats/token", flush=True)
    finetunes = {}
    if finetune_params is not None:
        for name, method in FINETUNES.items():
            ft_cfg = config_lib.load(finetune_params, [f"model.load_path={pretrain.out_dir}",
                                                       f"data.path={prepared['paths']['es']}", *method])
            finetunes[name] = train_and_evaluate(ft_cfg, out / "runs" / f"finetune_es_{name}", resume=True)
        df = runs.load_runs([r.out_dir for r in finetunes.values()])
        figures += plots.save(plots.tradeoff(df), out / "figures" / "finetune_tradeoff.html")
        print(describe_finetunes(finetunes))
    print("figures: " + ", ".join(str(f) for f in figures))
    return {"prepared": prepared, "pretrain": pretrain, "finetunes": finetunes, "figures": figures}


def describe_finetunes(results: dict[str, Any]) -> str:
    """Final Spanish loss, English forgetting and train time of each finetuning run."""
    lines = [f"{'finetune':<9} {'stop':<16} {'tokens':>9} {'es loss':>8} {'en loss':>8} "
             f"{'forgetting':>10} {'train s':>8}"]
    for name, r in results.items():
        f = r.final
        lines.append(f"{name:<9} {r.stop_reason:<16} {r.tokens:>9,} {f['valid_ntp']:>8.3f} "
                     f"{f['prev_ntp']:>8.3f} {f['forgetting']:>10.3f} {f['train_time_s']:>8.1f}")
    return "\n".join(lines)
