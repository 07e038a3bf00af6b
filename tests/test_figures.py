"""Figure tables, claim checks and the figure notebooks at a tiny scale (synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forgetting_lib import figures
from forgetting_lib.experiments import notebooks, sweep
from forgetting_lib.figures import analysis, high_lr, learning_rate, method_comp, replay_diagnostics
from forgetting_lib.prep.binarize import binarize

from finetune_fixtures import noisy_chain
from tokenfiles import write_token_file

V, T, B = 64, 16, 4
PRETRAIN = {
    "model": {"D": 32, "L": 1, "H": 16, "V": V, "dtype": "float32"},
    "data": {"T": T, "batch_size": B, "valid_tokens": 8 * T, "microbatch_rows": B},
    "opt": {"lr": 3e-3, "warmup_tokens": 0},
    "stop": {"num_tokens_train": 30 * B * T},
    "log": {"every_tokens": 10 * B * T, "progress": False},
}
FINETUNE = {
    "data": {"T": T, "batch_size": B, "valid_tokens": 8 * T, "microbatch_rows": B},
    "opt": {"lr": 3e-3, "warmup_tokens": 0},
    "reg": {"coeff": 1.0, "replay_batch_size": 2, "buffer": 2},
    "stop": {"num_tokens_train": 8 * B * T, "target_loss": 3.9},
    "log": {"every_tokens": 2 * B * T, "progress": False, "eval_kl": False},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("figure_data")
    return {
        "old": str(
            write_token_file(
                root / "old.bin", 0, vocab_size=V, dataset_token=1, tokens=noisy_chain(300 * T, seed=0)
            )
        ),
        "new": str(
            write_token_file(
                root / "new.bin", 0, vocab_size=V, dataset_token=2, tokens=noisy_chain(200 * T, seed=1)
            )
        ),
    }


def pretrain_stage(data, out, lrs=(3e-3,)):
    return {
        "base": PRETRAIN,
        "set": {"data.path": data["old"]},
        "grid": {"opt.lr": list(lrs)},
        "out": str(out / "pretrain"),
    }


def finetune_stage(data, grid, **set_):
    return {"base": FINETUNE, "after": "pretrain", "set": {"data.path": data["new"], **set_}, "grid": grid}


def run_figure(name, spec, tmp_path, target, **params):
    """Execute figure notebook `name` on `spec` (plus notebook `params`); its cells' outputs as JSON."""
    params = {
        "sweep": spec,
        "target_loss": target,
        "workers": 1,
        "notebook_runs": False,
        "figures_dir": str(tmp_path / "figures"),
        **params,
    }
    executed = notebooks.run_notebook(
        f"figures/{name}", params, tmp_path / "nb", cwd=Path(__file__).resolve().parents[1]
    )
    outputs = json.dumps([c.get("outputs") for c in json.loads(executed.read_text())["cells"]])
    assert (tmp_path / "figures" / f"{name}.html").is_file()
    return outputs


def test_method_comp_notebook(tmp_path, data):
    spec = {
        "out": str(tmp_path / "mc"),
        "stages": {
            "pretrain": pretrain_stage(data, tmp_path),
            "finetune": finetune_stage(
                data,
                {
                    "method": [
                        "standard",
                        {"lora_r16": {"lora.rank": 4}},
                        "kl_real",
                        "kl_self",
                        {"l2sp": {"reg.coeff": 0.1}},
                    ]
                },
            ),
        },
    }
    outputs = run_figure("method_comp", spec, tmp_path, 3.9)
    for text in ("kl_self", "paper_forgetting", "compute_multiplier", "KL self forgets", "LoRA forgets"):
        assert text in outputs
    table = method_comp.table(sweep.load_stage(spec, "finetune"), 3.9, sweep.load_stage(spec, "pretrain"))
    assert list(table.index) == ["standard", "lora_r16", "kl_real", "kl_self", "l2sp"]
    assert table[["forgetting", "old_loss", "compute_multiplier"]].notna().all().all()
    assert table.loc["standard", "vs_standard"] == 1.0


def test_replay_diagnostics_notebook(tmp_path, data):
    grid = {
        "replay": {
            "standard": {"method": "standard"},
            "real": {"method": "ntp_real"},
            "self": {"method": "ntp_self"},
            "temp3.0": {"method": "ntp_self", "reg.temperature": 3.0},
            "reuse4": {"method": "ntp_self", "reg.reuse": 4},
        }
    }
    spec = {
        "out": str(tmp_path / "rd"),
        "stages": {"pretrain": pretrain_stage(data, tmp_path), "finetune": finetune_stage(data, grid)},
    }
    outputs = run_figure("replay_diagnostics", spec, tmp_path, 4.1)
    for text in ("replayed", "unigram_js", "id_old_fraction", "abs_rho", "tracks forgetting best"):
        assert text in outputs
    table = replay_diagnostics.table(sweep.load_stage(spec, "finetune"), 4.1)
    assert table["reached_target"].all()
    assert list(table.index) == ["standard", "real", "self", "temp3.0", "reuse4"]
    assert list(table["self_generated"]) == [False, False, True, True, True]
    assert np.isnan(table.loc["standard", "unigram_js"])  # replays nothing: no diagnostics
    assert table.loc["real", "unigram_js"] < table.loc["temp3.0", "unigram_js"]
    # reuse 4 samples a quarter of the rows; its kept rows repeat within a chunk's passes
    assert table.loc["reuse4", "sampled_rows"] < table.loc["self", "sampled_rows"]
    assert table.loc["reuse4", "duplicate_rows"] > 0 == table.loc["self", "duplicate_rows"]
    ranked = replay_diagnostics.predictors(table)
    assert ranked["abs_rho"].iloc[0] == ranked["abs_rho"].max() and (ranked["points"] == 3).all()
    assert "no diagnostic" in replay_diagnostics.conclusion(table, ranked.assign(rho=np.nan))


def test_spearman_and_predictors_on_a_hand_made_table():
    assert analysis.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert analysis.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(analysis.spearman([1, 2], [1, 2]))  # too few points
    table = pd.DataFrame(
        {
            "self_generated": [True] * 4,
            "reached_target": [True, True, True, False],
            "forgetting": [0.1, 0.2, 0.3, 9.0],
            "unigram_js": [0.01, 0.02, 0.03, 0.0],  # same order as forgetting
            "eos_rate": [0.3, 0.1, 0.2, 0.0],
        },
        index=["a", "b", "c", "off_target"],
    )
    ranked = replay_diagnostics.predictors(table)
    assert list(ranked.index) == ["unigram_js", "eos_rate"] and ranked.loc["unigram_js", "rho"] == 1.0
    assert (ranked["points"] == 3).all()  # the point off the target is left out
    assert "unigram_js" in replay_diagnostics.conclusion(table.assign(), ranked)


def test_learning_rate_notebook(tmp_path, data):
    spec = {
        "out": str(tmp_path / "lr"),
        "stages": {
            "pretrain": pretrain_stage(data, tmp_path, lrs=(1e-3, 3e-3)),
            "finetune": finetune_stage(
                data,
                {
                    "ft_lr": {"3e-3": {"opt.lr": 3e-3}, "1e-3": {"opt.lr": 1e-3}},
                    "method": ["standard", "kl_real"],
                },
            ),
        },
    }
    outputs = run_figure("learning_rate", spec, tmp_path, 3.9)
    for text in ("lr_x_steps", "kl_real forgets less than standard finetuning", "pretrain LR 0.001"):
        assert text in outputs
    table = learning_rate.table(sweep.load_stage(spec, "finetune"), 3.9)
    assert (
        len(table) == 8
        and set(table["pretrain_lr"]) == {1e-3, 3e-3}
        and set(table["method"]) == {"standard", "kl_real"}
    )
    assert table[["forgetting", "steps"]].notna().all().all()


def test_high_lr_notebook(tmp_path, data):
    spec = {
        "out": str(tmp_path / "hl"),
        "stages": {
            "pretrain": pretrain_stage(data, tmp_path),
            "finetune": finetune_stage(
                data, {"ft_lr": {"3e-3": {"opt.lr": 3e-3}, "1e-3": {"opt.lr": 1e-3}}, "method": ["standard"]}
            ),
            "replay": finetune_stage(data, {"reg.coeff": [0.25, 0.5]}, **{"reg.method": "replace"}),
        },
    }
    outputs = run_figure("high_lr", spec, tmp_path, 3.9)
    assert "B: replay at high LR" in outputs and "A: lower LR" in outputs
    table = high_lr.table(sweep.load_stage(spec, "finetune"), sweep.load_stage(spec, "replay"), 3.9)
    assert sorted(table["replay_fraction"]) == [0.0, 0.0, 0.25, 0.5] and table["old_loss"].notna().all()


def hl_table(rows):
    return pd.DataFrame(
        rows, columns=["sweep", "lr", "replay_fraction", "old_loss", "train_time_s", "reached_target"]
    )


def test_high_lr_claim_compares_the_fastest_replay_run_that_matches_the_best_low_lr_run():
    table = hl_table(
        [
            ("A: lower LR", 1e-3, 0.0, 7.0, 2.0, True),
            ("A: lower LR", 1e-4, 0.0, 6.0, 40.0, True),
            ("A: lower LR", 1e-5, 0.0, 6.5, 400.0, True),  # slower and worse: not the best
            ("B: replay at high LR", 1e-3, 1 / 32, 6.2, 2.1, True),  # not below 6.0
            ("B: replay at high LR", 1e-3, 1 / 8, 5.5, 3.0, True),
            ("B: replay at high LR", 1e-3, 1 / 4, 5.0, 5.0, True),
        ]
    )
    ((holds, numbers),) = high_lr.claims(table).values()
    assert holds and numbers.startswith("13.3x")
    table.loc[4, "train_time_s"] = 4.5  # now 40 / 4.5 < 10
    ((holds, numbers),) = high_lr.claims(table).values()
    assert not holds and numbers.startswith("8.9x")
    table["old_loss"] = np.where(table["sweep"].str.startswith("B"), 6.1, table["old_loss"])
    ((holds, numbers),) = high_lr.claims(table).values()
    assert not holds and "best low-LR (LR 0.0001) old loss 6.000" in numbers


def test_learning_rate_claims_on_a_hand_made_table():
    rows = []
    for method, scale in (("standard", 1.0), ("kl_real", 0.1)):
        for lr, f in ((1e-2, 2.0), (1e-3, 1.2), (1e-4, 1.0), (1e-5, 0.98)):
            rows.append(
                {
                    "pretrain_lr": 3e-3,
                    "ft_lr": lr,
                    "method": method,
                    "forgetting": f * scale,
                    "steps": 10 / lr,
                    "lr_x_steps": 10.0,
                    "reached_target": True,
                }
            )
    claims = learning_rate.claims(pd.DataFrame(rows))
    assert all(holds for holds, _ in claims.values()), claims
    rows[3]["forgetting"] = 0.5  # the last drop is now the largest: no levelling off
    claims = learning_rate.claims(pd.DataFrame(rows))
    assert not claims["pretrain LR 0.003: and levels off (last drop < half the first)"][0]
    rows[3].update(forgetting=0.98, reached_target=False)  # a run off the target is not evidence
    claims = learning_rate.claims(pd.DataFrame(rows, index=[f"r{i}" for i in range(len(rows))]))
    assert claims["every run reached the target"] == (False, "r3")
    assert claims["pretrain LR 0.003: forgetting falls as the FT LR falls"][1] == "2.000 > 1.200 > 1.000"


def test_reproduce_runs_data_notebooks_then_figures_and_survives_a_failing_one(tmp_path, data):
    import yaml

    from test_notebooks import _write_corpus

    corpora = {
        lang: _write_corpus(tmp_path, lang).replace("files:", f"files:{tmp_path}/") for lang in ("en", "es")
    }
    scale = tmp_path / "params" / "quick"
    scale.mkdir(parents=True)
    files = {
        "01_tokenizer": {
            "corpora": corpora,
            "tokenizer_dir": str(tmp_path / "tok"),
            "vocab_size": 320,
            "chars_per_corpus": 20_000,
            "stats_documents": 5,
            "examples": ["the lord"],
            "figures_dir": str(tmp_path / "figures"),
        },
        "02_binarize": {
            "corpora": corpora,
            "dataset_ids": {"en": 0, "es": 1},
            "tokenizer_dir": str(tmp_path / "tok"),
            "data_dir": str(tmp_path / "data"),
            "max_tokens": 2000,
            "T": 16,
            "show_rows": 1,
            "figures_dir": str(tmp_path / "figures"),
        },
        "high_lr": {
            "sweep": {
                "out": str(tmp_path / "hl"),
                "stages": {
                    "pretrain": pretrain_stage(data, tmp_path),
                    "finetune": finetune_stage(
                        data, {"ft_lr": {"3e-3": {"opt.lr": 3e-3}}, "method": ["standard"]}
                    ),
                    "replay": finetune_stage(data, {"reg.coeff": [0.25]}, **{"reg.method": "replace"}),
                },
            },
            "target_loss": 3.9,
            "notebook_runs": False,
            "figures_dir": str(tmp_path / "figures"),
        },
    }
    for name, values in files.items():
        (scale / f"{name}.yaml").write_text(yaml.safe_dump(values))
    results = figures.reproduce(
        "quick", ["no_such_figure", "high_lr"], out=tmp_path / "out", params_dir=tmp_path / "params"
    )
    assert list(results) == ["01_tokenizer", "02_binarize", "figures/no_such_figure", "figures/high_lr"]
    assert str(results["figures/no_such_figure"]).startswith("failed:")
    assert all(isinstance(results[n], float) for n in ("01_tokenizer", "02_binarize", "figures/high_lr"))
    assert (tmp_path / "data" / "en.bin").is_file() and (tmp_path / "figures" / "high_lr.html").is_file()
    assert (tmp_path / "out" / "quick" / "notebooks" / "high_lr.ipynb").is_file()
    assert json.loads((tmp_path / "out" / "quick" / "timings.json").read_text()) == results


def test_lora_is_compared_with_standard_at_its_own_best_new_loss():
    def run(name, news, olds):
        return pd.DataFrame(
            {
                "run": name,
                "axis.method": name,
                "step": range(len(news)),
                "tokens": 0,
                "train_time_s": 0.0,
                "valid_ntp": news,
                "prev_ntp": olds,
                "parent.final_valid_ntp": 4.0,
            }
        )

    df = pd.concat(
        [
            run("standard", [9.0, 7.0, 6.0], [4.0, 5.0, 7.0]),  # 1.0 forgotten at 7.0
            run("lora_r16", [9.0, 8.0, 7.0], [4.0, 4.8, 5.2]),
        ]
    )  # 1.2 at its best, 7.0
    table = method_comp.table(df, 6.0)
    assert table.loc["standard", "forgetting"] == pytest.approx(3.0)
    assert not table.loc["lora_r16", "reached_target"]
    holds, numbers = method_comp.claims(table, df)[
        "LoRA forgets at least ~as much as standard at equal new-task loss"
    ]
    assert holds and numbers == "1.200 vs standard 1.000 at new-task loss 7.000"
    df.loc[df["run"] == "lora_r16", "prev_ntp"] = [4.0, 4.5, 4.7]  # 0.7 < 0.9 x 1.0
    assert not method_comp.claims(method_comp.table(df, 6.0), df)[
        "LoRA forgets at least ~as much as standard at equal new-task loss"
    ][0]


def test_instruct_notebook_exports_and_reimports_its_parent(tmp_path, sample_tokenizer):
    """The quick instruct flow at test size: a parent pretrained on English, exported as a Hugging
    Face folder, its tokenizer binarizing Python code, finetuned from `hf:<folder>` three ways."""
    english = binarize("sample:en", sample_tokenizer, tmp_path / "en.bin", dataset_id=0, max_tokens=30_000)
    model_dir, code = tmp_path / "instruct" / "model", tmp_path / "instruct" / "python.bin"
    pretrain = {**PRETRAIN, "model": {**PRETRAIN["model"], "V": sample_tokenizer.vocab_size}}
    finetune = {
        **FINETUNE,
        "model": {"load_path": f"hf:{model_dir}", "dtype": "float32"},
        "data": {**FINETUNE["data"], "path": str(code)},
        "stop": {"num_tokens_train": 8 * B * T},
    }
    spec = {
        "out": str(tmp_path / "instruct"),
        "stages": {
            "pretrain": {
                "base": pretrain,
                "set": {"data.path": str(tmp_path / "en.bin")},
                "grid": {"opt.lr": [3e-3]},
                "out": str(tmp_path / "pretrain"),
            },
            "finetune": {"base": finetune, "grid": {"method": ["standard", "ntp_real", "kl_self"]}},
        },
    }
    params = {
        "sweep": spec,
        "code_corpus": "files:{python_stdlib}/json/*.py",
        "code_tokens": 20_000,
        "target_acc": 0.05,
        "old_metric": "prev_acc",
        "workers": 1,
        "notebook_runs": False,
        "figures_dir": str(tmp_path / "figures"),
    }
    root = Path(__file__).resolve().parents[1]
    executed = notebooks.run_notebook("figures/instruct", params, tmp_path / "nb", cwd=root)
    outputs = json.dumps([c.get("outputs") for c in json.loads(executed.read_text())["cells"]])
    for text in ("old_drop", "paper_old_metric", "KL self loses", "reached_target"):
        assert text in outputs
    assert (tmp_path / "figures" / "instruct.html").is_file()
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "apertus"
    assert (
        json.loads((model_dir / "forgetting.json").read_text())["parent"]["dataset_token"]
        == (english["dataset_token"])
    )
    df = sweep.load_stage(spec, "finetune")
    assert set(df["axis.method"]) == {"standard", "ntp_real", "kl_self"}
    assert df[["prev_acc", "valid_acc", "prev_ntp"]].notna().all().all()
    first = df[df["step"] == 0]
    assert first["prev_ntp"].nunique() == 1  # every run starts from the same imported parent
    # the reimported parent's step-0 English loss is its pretraining run's final validation loss
    final = sweep.load_stage(spec, "pretrain").sort_values("step")["valid_ntp"].iloc[-1]
    assert float(first["prev_ntp"].iloc[0]) == pytest.approx(float(final), rel=1e-5)
