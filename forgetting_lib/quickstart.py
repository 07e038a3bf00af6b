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
        overrides: list[str] | None = None) -> dict[str, Any]:
    """Prepare the sample, pretrain on English per `params`, and plot the loss curve."""
    out = Path(out)
    prepared = prepare_sample(out)
    print(describe_sample(prepared), flush=True)
    cfg = config_lib.load(params, [f"data.path={prepared['paths']['en']}", *(overrides or [])])
    from .train import train_and_evaluate

    result = train_and_evaluate(cfg, out / "runs" / cfg.run.name, resume=True)
    df = runs.load_runs(result.out_dir)
    figures = plots.save(plots.loss_curves(df, title="Pretraining on the English sample"),
                         out / "figures" / "pretrain_loss.html")
    final = result.final
    print(f"pretrain: {result.status} ({result.stop_reason}) after {result.tokens:,} tokens; "
          f"English valid loss {final['valid_ntp']:.3f} nats/token "
          f"(second half of rows {final['valid_ntp_h2']:.3f}); run folder {result.out_dir}")
    print("figures: " + ", ".join(str(f) for f in figures))
    return {"prepared": prepared, "pretrain": result, "figures": figures}
