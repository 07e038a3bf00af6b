"""Finetuning a Hugging Face model with the engine: every replay method, LoRA, the sampler, the
metrics, sweeps, resume and export, on the tiny Llama 3 fixture (tests/hf_fixtures/llama3: GQA,
tied embeddings, Llama 3 RoPE scaling; its real `tokenizers` tokenizer binarizes the data).

The parent has no old data of its own: `data.old_path` names a token file for real replay and
the `prev` evaluation, and self-generated rows are prompted by its BOS token (the paper's
instruct setup).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib import config as config_lib, runs
from forgetting_lib.engine import assemble, checkpoint, finetune, hf, model as model_lib
from forgetting_lib.engine.evaluate import make_evaluator
from forgetting_lib.engine.train import train_and_evaluate
from forgetting_lib.experiments import sweep
from forgetting_lib.prep.binarize import binarize
from forgetting_lib.prep.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "hf_fixtures" / "llama3"
T, B = 32, 4
STEPS, EVERY = 12, 4
CHECKPOINT = 2 * EVERY * B * T  # tokens: a checkpoint at step 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Old and new token files made with the fixture's tokenizer: two parts of Python's library."""
    root = tmp_path_factory.mktemp("hf_data")
    old = binarize(
        "files:{python_stdlib}/json/*.py", FIXTURE, root / "old.bin", dataset_id=0, max_tokens=20_000
    )
    binarize("files:{python_stdlib}/csv.py", FIXTURE, root / "new.bin", dataset_id=0, max_tokens=20_000)
    assert old["dtype"] == "uint16" and old["dataset_token"] == load_tokenizer(FIXTURE).bos_id
    return {"old": root / "old.bin", "new": root / "new.bin", "root": root}


def finetune_config(data: dict[str, Path], **overrides) -> dict:
    raw = {
        "run": {"seed": 0},
        "model": {"load_path": f"hf:{FIXTURE}", "dtype": "float32"},
        "data": {
            "path": str(data["new"]),
            "old_path": str(data["old"]),
            "T": T,
            "batch_size": B,
            "valid_tokens": 8 * T,
            "microbatch_rows": B,
        },
        "opt": {"lr": 3e-3, "warmup_tokens": 0},
        "reg": {"coeff": 1.0, "replay_batch_size": 2, "buffer": 2},
        "stop": {"num_tokens_train": STEPS * B * T},
        "log": {
            "every_tokens": EVERY * B * T,
            "progress": False,
            "checkpoint_every_tokens": 2 * EVERY * B * T,
        },
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    if not raw["data"]["old_path"]:
        del raw["data"]["old_path"]
    return raw


METHODS = ["standard", "lora_r16", "ntp_real", "ntp_self", "kl_real", "kl_self"]


@pytest.fixture(scope="module")
def swept(data) -> dict:
    spec = {
        "out": str(data["root"] / "sweep"),
        "stages": {"finetune": {"base": finetune_config(data), "grid": {"method": METHODS}}},
    }
    status = sweep.run_sweep(spec, notebook=False, log=lambda _: None)
    assert (status["status"] == "finished").all(), status
    return {"spec": spec, "df": sweep.load_stage(spec, "finetune")}


def test_every_method_finetunes_a_hf_model(swept):
    df = swept["df"]
    assert set(df["axis.method"]) == set(METHODS)
    for method, rows in df.groupby("axis.method"):
        rows = rows.sort_values("step")
        assert list(rows["step"]) == list(range(0, STEPS + 1, EVERY)), method
        for metric in ("valid_ntp", "prev_ntp", "valid_acc", "prev_acc"):
            assert rows[metric].notna().all() and np.isfinite(rows[metric]).all(), (method, metric)
        assert rows["valid_ntp"].iloc[-1] < rows["valid_ntp"].iloc[0], method  # it learns the new data
    first = df[df["step"] == 0]
    # every run starts from the same imported model: identical step-0 evaluations
    assert first["prev_ntp"].nunique() == 1 and first["valid_ntp"].nunique() == 1
    # forgetting is measured from the parent's own step-0 old-data loss (it has no final_valid_ntp)
    assert "forgetting" not in df or df["forgetting"].isna().all()


def test_step_zero_metrics_are_the_imported_models(swept, data):
    """The run's step-0 old-data loss is the imported weights' loss on its prev rows."""
    cfg = finetune.resolve(config_lib.load(finetune_config(data)))
    setup = assemble.build_setup(cfg)
    params = hf.load_params(FIXTURE, cfg.model)
    tokens, mask = setup.eval_sets["prev"]
    direct = make_evaluator(model_lib.make_hidden(setup.graphdef))(params, None, tokens, mask)
    first = swept["df"]
    step0 = first[(first["step"] == 0) & (first["axis.method"] == "standard")]
    assert float(step0["prev_ntp"].iloc[0]) == pytest.approx(float(direct["ntp"]), rel=1e-5)
    assert cfg.parent.dataset_token == load_tokenizer(FIXTURE).bos_id and cfg.parent.seed == -1


def test_self_generated_rows_start_with_bos_or_the_chat_prompt(data):
    tok = load_tokenizer(FIXTURE)
    for prompt, expected in (("id", [tok.bos_id]), ("chat", tok.chat_prompt())):
        cfg = config_lib.load(finetune_config(data, **{"reg.method": "kl_pre", "reg.synth": True}))
        cfg = finetune.resolve(cfg.replace({"reg.prompt": prompt}))
        setup = assemble.build_setup(cfg)
        rows = np.asarray(setup.replay.batch(0))  # [R, T]
        assert rows.shape == (2, T)
        np.testing.assert_array_equal(rows[:, : len(expected)], np.tile(expected, (2, 1)))
    assert len(tok.chat_prompt()) > 1


class Interrupted(Exception):
    """Stands in for SIGKILL."""


def test_interrupted_hf_finetune_resumes_to_identical_metrics(swept, data):
    reference = [r for r in runs.read_metrics(_point_dir(swept, "kl_self"))]
    cfg = config_lib.load(finetune_config(data, **{"reg.method": "kl_pre", "reg.synth": True}))
    out = data["root"] / "interrupted"
    append = runs.append_metrics

    def append_then_die(run_dir, row):
        append(run_dir, row)
        if row["step"] == STEPS:  # after the step-8 checkpoint, before the final one
            raise Interrupted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "append_metrics", append_then_die)
        with pytest.raises(Interrupted):
            train_and_evaluate(cfg, out)
    assert runs.read_summary(out) is None
    assert checkpoint.read_meta(out / runs.CHECKPOINT)["tracker"]["step"] == 8
    result = train_and_evaluate(cfg, out, resume=True)
    assert result.status == "finished"
    losses = lambda rows: [(r["step"], r["valid_ntp"], r["prev_ntp"]) for r in rows]  # noqa: E731
    assert losses(runs.read_metrics(out)) == losses(reference)


def _point_dir(swept, method: str) -> Path:
    return Path(swept["spec"]["out"]) / "finetune" / f"method={method}"


def test_a_finetuned_hf_model_exports_and_returns(swept, tmp_path):
    """A run of an imported model goes back out as a Llama folder with the source's tokenizer, and
    `hf:` reads it as the run's final model; a finetune of the export takes the run's old data."""
    run_dir = _point_dir(swept, "ntp_real")
    out = finetune.export_run(run_dir, tmp_path / "export", reference_rows=2)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").read_bytes() == (FIXTURE / "tokenizer.json").read_bytes()
    cfg, graphdef, params = finetune.load_run(run_dir)
    back = hf.load_params(out, cfg.model)
    tokens = np.load(out / "reference_tokens.npy")
    np.testing.assert_allclose(
        np.asarray(model_lib.make_forward(graphdef)(back, jnp.asarray(tokens))),
        np.load(out / "reference_logits.npy"),
        atol=1e-5,
    )
    tokens_file = Path(cfg.parent.data_path)  # the HF parent's old data: not the run's own data
    made = hf.provenance(out)
    assert made["parent"]["final_valid_ntp"] == runs.read_summary(run_dir)["final"]["valid_ntp"]
    raw = finetune_config({"new": cfg.data.path, "old": ""}, **{"model.load_path": f"hf:{out}"})
    again = finetune.resolve(config_lib.load(raw))
    assert Path(again.parent.data_path).resolve() == Path(cfg.data.path).resolve()
    assert again.parent.final_valid_ntp == made["parent"]["final_valid_ntp"]
    # other old data: the parent's final loss is on other rows, so forgetting is read from step 0
    other = finetune.resolve(config_lib.load({**raw, "data": {**raw["data"], "old_path": str(tokens_file)}}))
    assert other.parent.data_path == str(tokens_file) and other.parent.final_valid_ntp is None


def test_a_hf_parent_clash_names_the_key(data):
    cfg = config_lib.load(finetune_config(data)).replace({"model.D": 128})
    with pytest.raises(finetune.FinetuneError, match="model.D=128"):
        finetune.resolve(cfg)


def test_bf16_parameters_train(swept, data, tmp_path):
    cfg = config_lib.load(finetune_config(data, **{"stop.num_tokens_train": 2 * B * T}))
    cfg = cfg.replace({"model.param_dtype": "bfloat16", "log.checkpoint_every_tokens": None})
    result = train_and_evaluate(cfg, tmp_path / "bf16")
    assert result.status == "finished"
    _, _, params = finetune.load_run(tmp_path / "bf16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    # a bf16 finetune of a float32 run parent (and back): the parent is read in its own dtype
    child = cfg.replace({"model.load_path": str(_point_dir(swept, "standard")), "data.old_path": ""})
    assert train_and_evaluate(child, tmp_path / "bf16_child").status == "finished"
    back = child.replace({"model.load_path": str(tmp_path / "bf16"), "model.param_dtype": "float32"})
    assert train_and_evaluate(back, tmp_path / "f32_child").status == "finished"
