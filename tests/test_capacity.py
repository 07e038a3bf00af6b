"""The capacity half: the synthetic language pair (exact entropy, streams, one token per word
through a real SentencePiece model), the capacity figures' tables and claims, and their four
notebooks at a tiny scale through papermill."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from forgetting_lib.experiments import sweep
from forgetting_lib.figures import capacity, grid2d, model_capacity, model_size, pretrain_length
from forgetting_lib.prep import binarize, synthetic
from forgetting_lib.prep.binarize import TokenFileError
from forgetting_lib.prep.corpora import CorpusError, iter_documents

from test_figures import run_figure

TINY = "words=16&branch=3"  # a 16-word pair: a 64-piece tokenizer holds it whole


def test_bad_specs_name_the_key_and_the_fix():
    for spec, words in [
        ("synthetic:english", "old, new"),
        ("synthetic:old?wrds=5", "unknown option 'wrds'"),
        ("synthetic:old?words=many", "not a number"),
        ("synthetic:old?words=2.5", "whole number"),
        ("synthetic:old?branch=0", "branch must be in"),
        ("synthetic:new?shared=1.5", "shared must be in"),
        ("synthetic:new?words=10&branch=8&shared=0", "raise words"),
        ("synthetic:old?seed=-1", "seed must be"),
    ]:
        with pytest.raises(CorpusError, match=words):
            iter_documents(spec)


def test_the_entropy_rate_is_the_streams():
    """The exact rate equals the conditional entropy of next word given previous, counted."""
    spec = "synthetic:old?words=32&branch=4&tokens=300000"
    words = [w for doc in iter_documents(spec) for w in [*doc.split(), "</s>"]]
    pairs, firsts = Counter(zip(words, words[1:])), Counter(words[:-1])
    counted = -sum(n / (len(words) - 1) * np.log(n / firsts[a]) for (a, _), n in pairs.items())
    h = synthetic.entropy(spec)
    assert counted == pytest.approx(h.rate, abs=0.02)
    assert h.marginal > h.rate > 0 and h.words_per_document == pytest.approx(64)
    mean_doc = (len(words) - words.count("</s>")) / words.count("</s>")
    assert mean_doc == pytest.approx(64, rel=0.05)


def test_streams_are_reproducible_independent_and_the_pair_is_related():
    first = list(iter_documents(f"synthetic:old?{TINY}&tokens=2000", seed=0))
    assert first == list(iter_documents(f"synthetic:old?{TINY}&tokens=2000", seed=0))
    assert first != list(iter_documents(f"synthetic:old?{TINY}&tokens=2000", seed=1))
    assert sum(len(d.split()) + 1 for d in first) in (2000, 2001)  # `tokens` words, EOS included
    assert all(d.startswith(" ") for d in first)  # every word after a space: one piece each
    old, new = synthetic.language(f"synthetic:old?{TINY}"), synthetic.language(f"synthetic:new?{TINY}")
    assert old.lexicon == new.lexicon and len(set(old.lexicon)) == 16
    for t in (old.transitions, new.transitions):
        np.testing.assert_allclose(t.sum(axis=1), 1.0)
    kept = [
        len(set(np.flatnonzero(old.transitions[s, :-1])) & set(np.flatnonzero(new.transitions[s, :-1])))
        for s in range(17)
    ]
    assert set(kept) == {round(0.5 * 3)}  # `shared` of each state's successors
    unrelated = synthetic.language(f"synthetic:new?{TINY}&shared=0")
    assert not (np.minimum(old.transitions[:, :-1], unrelated.transitions[:, :-1]) > 0).any()


def test_a_real_tokenizer_learns_one_token_per_word_and_the_floor(tmp_path):
    def prepare():
        return capacity.prepare_data(
            tmp_path / "pair",
            old=f"synthetic:old?{TINY}",
            new=f"synthetic:new?{TINY}",
            vocab_size=64,
            old_tokens=5000,
            new_tokens=3000,
            byte_fallback=False,
        )

    info = prepare()
    assert info["old"]["tokens"] == 5000 and info["new"]["tokens"] == 3000
    assert info["old"]["tokens_per_word"] == 1.0 == info["new"]["tokens_per_word"]
    tokens, meta = binarize.read_token_file(info["old"]["path"])
    assert len(np.unique(np.asarray(tokens))) <= 17  # 16 words and the EOS
    h = synthetic.entropy(f"synthetic:old?{TINY}")
    floor = capacity.loss_floor(info["old"], 64)
    assert h.rate < floor == pytest.approx((h.marginal + 62 * h.rate) / 63)
    assert np.isnan(capacity.loss_floor({"path": "x.bin"}, 64))  # a natural corpus: unknown
    again = prepare()  # reused, not remade
    assert again == info and binarize.read_token_file(info["old"]["path"])[1]["created"] == meta["created"]
    with pytest.raises(TokenFileError, match="never ends.*--max-tokens"):
        binarize.binarize(f"synthetic:old?{TINY}", info["tokenizer"], tmp_path / "x.bin", dataset_id=0)
    assert not (tmp_path / "x.bin").exists()


def test_best_at_target_keeps_the_lowest_old_loss_among_runs_that_got_there():
    def run(name, parent, coeff, new, old):
        return pd.DataFrame(
            {
                "run": name,
                "step": [0, 1],
                "tokens": [0, 100],
                "train_time_s": [0.0, 1.0],
                "valid_ntp": new,
                "prev_ntp": old,
                "parent.final_valid_ntp": 2.0,
                "reg.coeff": coeff,
                "axis.pretrain.D": parent,
            }
        )

    df = pd.concat(
        [
            run("a1", "16", 1.0, [3.0, 2.4], [2.0, 2.5]),  # reached, forgot 0.5 at 2.4
            run("a10", "16", 10.0, [3.0, 2.8], [2.0, 2.05]),  # never reached 2.5
            run("b1", "32", 1.0, [3.0, 2.0], [2.0, 2.4]),
            run("b10", "32", 10.0, [3.0, 2.0], [2.0, 2.1]),
        ]
    )
    best = capacity.best_at_target(df, 2.5, "axis.pretrain.D")
    assert best.loc["16", "run"] == "a1" and best.loc["16", "reached_runs"] == 1
    assert best.loc["32", "run"] == "b10" and best.loc["32", "forgetting"] == pytest.approx(0.05)
    assert capacity.strongest_misses(df, 2.5, "D", 16)[0]
    assert not capacity.strongest_misses(df, 2.5, "D", 32)[0]
    # model_size's claims: forgetting must fall over >= 4 widths, all at the target
    sizes = [16, 24, 32, 48]
    (rho_key, falls), (_, smallest) = model_size.claims(slices(sizes, [0.5, 0.2, 0.1, 0.05]), df, 2.5).items()
    assert falls[0] and smallest[0] and "coefficient 10" in smallest[1]
    rises = model_size.claims(slices(sizes, [0.05, 0.2, 0.1, 0.5]), df, 2.5)[rho_key]
    assert not rises[0] and "rho 0.80" in rises[1]
    assert not model_size.claims(slices(sizes[:3], [0.5, 0.2, 0.1]), df, 2.5)[rho_key][0]


def slices(x, forgetting, reached=None):
    n = len(x)
    return pd.DataFrame(
        {
            "params": np.asarray(x, float) * 1000,
            "forgetting": forgetting,
            "reached_target": reached if reached is not None else [True] * n,
        },
        index=pd.Index(np.asarray(x, float)),
    )


def test_size_and_length_claims_hold_and_fail():
    rho_key = next(iter(pretrain_length.claims(slices([10, 30, 100, 300, 1000], [0.0, 0.1, 0.2, 0.3, 0.4]))))
    good = pretrain_length.claims(slices([10, 30, 100, 300, 1000], [0.01, 0.1, 0.2, 0.3, 0.4]))
    assert all(holds for holds, _ in good.values())
    bad = pretrain_length.claims(slices([10, 30, 100, 300, 1000], [0.3, 0.1, 0.2, 0.0, 0.4]))
    assert not bad[rho_key][0] and not all(h for h, _ in bad.values())
    few = pretrain_length.claims(slices([10, 30, 100], [0.0, 0.1, 0.2]))
    assert not few[rho_key][0]  # fewer than 5 lengths
    off = pretrain_length.claims(
        slices([10, 30, 100, 300, 1000], [0.01, 0.1, 0.2, 0.3, 0.4], [True] * 4 + [False])
    )
    assert not off[rho_key][0] and "4 lengths" in off[rho_key][1]


def test_grid_claims_count_adjacent_pairs():
    grid = pd.DataFrame(
        [[0.3, 0.4, 0.5], [0.2, 0.3, 0.1], [0.1, 0.2, 0.3]], index=[16, 24, 32], columns=[10, 30, 100]
    )
    assert grid2d.adjacent_pairs(grid) == (5, 6, 5, 6)  # one width pair and one TPP pair break the order
    rows = []
    for method, scale, mult in ((grid2d.NONE, 1.0, 0.5), (grid2d.KL, 0.05, 0.9)):
        for d in grid.index:
            for x in grid.columns:
                rows.append((method, d, float(x), scale * grid.loc[d, x], True, mult))
    table = pd.DataFrame(rows, columns=["method", "D", "tpp", "forgetting", "reached_target", "multiplier"])
    table = table.set_index(["method", "D", "tpp"]).sort_index()
    claims = grid2d.claims(table)
    assert all(holds for holds, _ in claims.values())
    assert grid2d.heatmap(table, grid2d.KL, "forgetting").shape == (3, 3)
    worse = table.copy()
    worse.loc[(grid2d.KL, 32, 100.0), "forgetting"] = 1.0
    worse.loc[(grid2d.KL, 16, 10.0), "multiplier"] = 0.1
    claims = grid2d.claims(worse)
    assert not claims["KL forgets less than no regularisation in every cell"][0]
    assert not claims["KL's compute multiplier >= no regularisation's in every cell"][0]


def test_frontier_interpolates_only_where_it_was_measured():
    front = pd.DataFrame(
        {
            "new_loss": [2.0, 3.0, 4.0, 3.5],
            "old_loss": [4.0, 3.0, 2.0, 3.5],
            "on_frontier": [True, True, True, False],
        }
    )
    got = model_capacity.frontier_old_loss(front, np.array([1.5, 2.0, 2.5, 3.5, 4.5]))
    np.testing.assert_allclose(got, [np.nan, 4.0, 3.5, 2.5, np.nan])
    roles = model_capacity.roles(pd.Series(["300", "20", "300"]))
    assert list(roles) == [model_capacity.OVERTRAINED, model_capacity.CHINCHILLA, model_capacity.OVERTRAINED]


# ----- the four notebooks at a tiny scale -----

V, T, B = 64, 16, 4
PRETRAIN = {
    "model": {"D": 16, "L": 1, "H": 8, "V": V, "dtype": "float32"},
    "data": {"T": T, "batch_size": B, "valid_tokens": 8 * T, "microbatch_rows": B},
    "opt": {"lr": 1e-2, "warmup_tokens": 0, "schedule": "cosine"},
    "stop": {"tokens_per_param": 1.0},
    "log": {"every_tokens": 8 * B * T, "progress": False},
}
FINETUNE = {
    "data": {"T": T, "batch_size": B, "valid_tokens": 8 * T, "microbatch_rows": B},
    "opt": {"lr": 1e-2, "warmup_tokens": 0},
    "reg": {"method": "kl_pre", "coeff": 1.0, "replay_batch_size": 2, "buffer": 2},
    "stop": {"num_tokens_train": 6 * B * T, "target_loss": 3.9},
    "log": {"every_tokens": 2 * B * T, "progress": False, "eval_kl": False},
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pair")
    return {
        "out": str(out),
        "old": f"synthetic:old?{TINY}",
        "new": f"synthetic:new?{TINY}",
        "vocab_size": V,
        "byte_fallback": False,
        "old_tokens": 30000,
        "new_tokens": 12000,
    }


def tiny_pretrain(pair, out, grid, **set_):
    return {
        "base": PRETRAIN,
        "set": {"data.path": f"{pair['out']}/old.bin", **set_},
        "grid": grid,
        "out": str(out),
    }


def tiny_finetune(pair, grid, **set_):
    return {
        "base": FINETUNE,
        "after": "pretrain",
        "set": {"data.path": f"{pair['out']}/new.bin", **set_},
        "grid": grid,
    }


TPP = {"0.5": {"stop.tokens_per_param": 0.5}, "1": {"stop.tokens_per_param": 1.0}}


def test_model_size_and_pretrain_length_notebooks(tmp_path, pair):
    ms = {
        "out": str(tmp_path / "ms"),
        "stages": {
            "pretrain": tiny_pretrain(
                pair,
                tmp_path / "ms_pre",
                {"model.D": [8, 16]},
                **{
                    "opt.schedule": "constant",
                    "stop.tokens_per_param": None,
                    "stop.num_tokens_train": 4096,
                    "stop.target_loss": 3.8,
                },
            ),
            "finetune": tiny_finetune(pair, {"reg.coeff": [0.1, 10.0]}),
        },
    }
    outputs = run_figure("model_size", ms, tmp_path, 3.9, data=pair)
    for text in ("old_finetuned", "paper_forgetting", "forgetting falls with size", "smallest width"):
        assert text in outputs
    table = model_size.table(sweep.load_stage(ms, "finetune"), sweep.load_stage(ms, "pretrain"), 3.9, 1.0)
    assert list(table.index) == [8.0, 16.0] and table["params"].is_monotonic_increasing
    assert (table["forgetting"] == table["old_finetuned"] - table["old_pretrained"]).all()
    assert set(table["coeff"]) <= {0.1, 10.0}

    pl = {
        "out": str(tmp_path / "pl"),
        "stages": {
            "pretrain": tiny_pretrain(pair, tmp_path / "shared_pre", {"model.D": [16], "tpp": TPP}),
            "finetune": tiny_finetune(pair, {"reg.coeff": [1.0]}),
        },
    }
    outputs = run_figure("pretrain_length", pl, tmp_path, 3.9, data=pair)
    assert "forgetting rises with TPP" in outputs and "near zero" in outputs
    table = pretrain_length.table(
        sweep.load_stage(pl, "finetune"), sweep.load_stage(pl, "pretrain"), 3.9, 1.0
    )
    assert list(table.index) == [0.5, 1.0]
    assert table["trained_tpp"].to_numpy() == pytest.approx([0.5, 1.0], rel=0.3)  # whole steps


def test_model_capacity_and_2d_grid_notebooks(tmp_path, pair):
    mc = {
        "out": str(tmp_path / "mc"),
        "stages": {
            "frontier": {
                **tiny_pretrain(pair, tmp_path / "frontier", {"mix.fraction": [0.25, 0.5, 0.75]}),
                "set": {
                    "data.path": f"{pair['out']}/old.bin",
                    "mix.path": f"{pair['out']}/new.bin",
                    "mix.valid_tokens": 8 * T,
                    "stop.tokens_per_param": 2.0,
                },
            },
            "pretrain": tiny_pretrain(pair, tmp_path / "shared_pre", {"model.D": [16], "tpp": TPP}),
            "finetune": tiny_finetune(pair, {"reg.coeff": [0.1, 1.0]}, **{"reg.synth": True}),
        },
    }
    outputs = run_figure("model_capacity", mc, tmp_path, 3.9, data=pair)
    for text in ("on_frontier", "below the frontier", "20-TPP model"):
        assert text in outputs
    front = model_capacity.frontier(sweep.load_stage(mc, "frontier"))
    assert list(front["fraction"].sort_values()) == [0.25, 0.5, 0.75] and front["on_frontier"].any()
    points = model_capacity.finetune_points(sweep.load_stage(mc, "finetune"), front)
    assert set(points["parent"]) == {model_capacity.OVERTRAINED, model_capacity.CHINCHILLA}

    grid = {
        "out": str(tmp_path / "grid"),
        "stages": {
            "pretrain": tiny_pretrain(pair, tmp_path / "shared_pre", {"model.D": [8, 16], "tpp": TPP}),
            "finetune": tiny_finetune(pair, {"method": ["standard", "kl_real"]}, **{"reg.coeff": 10.0}),
        },
    }
    outputs = run_figure("2d_grid", grid, tmp_path, 3.9, data=pair)
    assert "adjacent pairs" in outputs and "compute multiplier" in outputs
    table = grid2d.table(sweep.load_stage(grid, "finetune"), sweep.load_stage(grid, "pretrain"), 3.9)
    assert len(table) == 8 and table["multiplier"].between(0, 1).all()
    # the D=16 pretraining points were shared with the model_capacity sweep, not trained again
    assert sorted(p.name for p in (tmp_path / "shared_pre").iterdir()) == [
        "D=16__tpp=0.5",
        "D=16__tpp=1",
        "D=8__tpp=0.5",
        "D=8__tpp=1",
    ]


def test_the_command_line_makes_a_synthetic_pair_from_another_directory(tmp_path, monkeypatch, capsys):
    from forgetting_lib.__main__ import main as cli_main

    monkeypatch.chdir(tmp_path)
    old, new = f"synthetic:old?{TINY}", f"synthetic:new?{TINY}"
    args = ["tokenizer", "--corpus", old, "--corpus", new, "--vocab-size", "64", "--no-byte-fallback"]
    assert cli_main([*args, "--out", "tok"]) == 0
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["byte_fallback"] is False
    assert (
        cli_main(
            ["binarize", "--corpus", old, "--tokenizer", "tok", "--out", "d/old.bin", "--dataset-id", "0"]
        )
        == 2
    )
    assert "never ends" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "binarize",
                "--corpus",
                old,
                "--tokenizer",
                "tok",
                "--out",
                "d/old.bin",
                "--dataset-id",
                "0",
                "--max-tokens",
                "1000",
            ]
        )
        == 0
    )
    assert binarize.read_token_file("d/old.bin")[1]["num_tokens"] == 1000
