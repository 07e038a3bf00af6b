"""Dataset-id conditioning on the real bilingual sample: a model pretrained on English and Spanish
rows (each row starting with its language's id token) samples Spanish-looking rows when prompted
with the Spanish id and English-looking rows with the English id. This is what makes
self-generated replay of *one* old distribution possible."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from forgetting_lib import config as config_lib
from forgetting_lib.engine import data as data_lib, model as model_lib
from forgetting_lib.engine.checkpoint import load
from forgetting_lib.engine.sampling import make_sampler, sample_from_id
from forgetting_lib.engine.train import train_and_evaluate
from forgetting_lib.prep.binarize import binarize

T, V = 64, 4096


def unigram(rows: np.ndarray) -> np.ndarray:
    """Token frequencies over positions 1.. of every row (position 0 is the id token)."""
    counts = np.bincount(np.asarray(rows)[:, 1:].ravel(), minlength=V).astype(np.float64)
    return counts / counts.sum()


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


@pytest.mark.slow
def test_rows_sampled_with_an_id_look_like_that_language(tmp_path, sample_tokenizer):
    paths = {}
    for lang, dataset_id in (("en", 0), ("es", 1)):
        paths[lang] = tmp_path / f"{lang}.bin"
        binarize(f"sample:{lang}", sample_tokenizer, paths[lang], dataset_id=dataset_id, max_tokens=300_000)
    cfg = config_lib.load(
        {
            "data": {"path": str(paths["en"]), "T": T, "batch_size": 16, "valid_tokens": 8192},
            "mix": {"path": str(paths["es"]), "fraction": 0.5, "valid_tokens": 8192},
            "model": {"D": 64, "L": 2, "H": 32, "V": V},
            "opt": {"lr": 3e-3, "warmup_tokens": 10_000},
            "stop": {"num_tokens_train": 250_000},
            "log": {"every_tokens": 125_000, "progress": False},
        }
    )
    run = train_and_evaluate(cfg, tmp_path / "run")
    graphdef, abstract = model_lib.abstract_params(cfg.model)
    params = load(run.out_dir / "checkpoint", {"params": abstract})[0]["params"]
    sampler = make_sampler(graphdef, length=T)
    real, sampled = {}, {}
    for i, lang in enumerate(("en", "es")):
        rows = data_lib.open_rows(paths[lang], T=T, valid_tokens=8192, split_seed=0, vocab_size=V)
        real[lang] = unigram(rows.rows(rows.valid_rows))
        token = sample_tokenizer.dataset_token(i)
        sampled[lang] = unigram(sample_from_id(sampler, params, token, 64, jax.random.key(i)))
    for lang, other in (("en", "es"), ("es", "en")):
        same, cross = total_variation(sampled[lang], real[lang]), total_variation(sampled[lang], real[other])
        assert same < 0.6 * cross, (lang, same, cross)
