"""The dry-run cost arithmetic (experiments/cost.py): tokens from each length rule, FLOPs linear in
tokens, the regularisers' extra work, the parent's architecture for finetunes, table totals."""

from __future__ import annotations

import math

import pytest
import yaml

from forgetting_lib import config as config_lib
from forgetting_lib.__main__ import main as cli_main
from forgetting_lib.engine import model as model_lib
from forgetting_lib.experiments import cost, sweep

from tokenfiles import write_token_file

V, T, B = 64, 16, 4
MODEL = {"D": 32, "L": 2, "H": 16, "V": V}
PRETRAIN = {
    "model": MODEL,
    "data": {"T": T, "batch_size": B, "valid_tokens": 8 * T},
    "stop": {"num_tokens_train": 6 * B * T},
    "log": {"every_tokens": 3 * B * T},
}
FINETUNE = {
    "model": {"load_path": "parent"},
    "data": {"T": T, "batch_size": B, "valid_tokens": 8 * T},
    "reg": {"coeff": 1.0, "replay_batch_size": 2, "buffer": 2},
    "stop": {"num_tokens_train": 4 * B * T},
    "log": {"every_tokens": 2 * B * T, "eval_kl": False},
}
C = model_lib.flops_per_token(config_lib.ModelConfig(**MODEL), T)  # training FLOPs per token
F = C / 3  # forward FLOPs per token


def finetune(*overrides: str) -> config_lib.Config:
    parent = config_lib.from_dict(PRETRAIN)
    return cost.with_parent(config_lib.from_dict(FINETUNE, list(overrides)), parent)


@pytest.mark.parametrize("method", ["none", "kl_pre synth", "ntp_pre", "kl_dwn", "ewc", "lora"])
def test_training_flops_grow_linearly_in_tokens(method):
    extra = {
        "none": [],
        "kl_pre synth": ["reg.method=kl_pre", "reg.synth=true", "reg.buffer=1"],
        "ntp_pre": ["reg.method=ntp_pre"],
        "kl_dwn": ["reg.method=kl_dwn"],
        "ewc": ["reg.method=ewc"],
        "lora": ["lora.rank=4"],
    }[method]
    one = cost.point_cost(finetune(*extra, f"stop.num_tokens_train={10 * B * T}"))
    two = cost.point_cost(finetune(*extra, f"stop.num_tokens_train={20 * B * T}"))
    assert two.tokens == 2 * one.tokens == 20 * B * T
    once = 8 * 2 * T * C if method == "ewc" else 0.0  # the Fisher's per-row gradients, once per run
    assert two.train_flops - once == pytest.approx(2 * (one.train_flops - once))
    assert two.train_flops - once == pytest.approx(two.tokens * two.flops_per_token)


def test_each_regulariser_adds_its_own_work_per_step():
    steps, R, S = 4, 2, F - 2 * MODEL["L"] * T * MODEL["D"]
    base = cost.point_cost(finetune()).train_flops
    assert base == pytest.approx(steps * B * T * C)
    ntp = cost.point_cost(finetune("reg.method=ntp_pre")).train_flops
    kl = cost.point_cost(finetune("reg.method=kl_pre")).train_flops
    kl_self = cost.point_cost(finetune("reg.method=kl_pre", "reg.synth=true")).train_flops
    assert ntp - base == pytest.approx(steps * R * T * C)  # replay rows: forward + backward
    assert kl - ntp == pytest.approx(steps * R * T * F)  # the frozen parent's forward on them
    assert kl_self - kl == pytest.approx(steps * R * T * S)  # sampling them (buffer 2 divides 4 steps)
    dwn = cost.point_cost(finetune("reg.method=kl_dwn")).train_flops
    assert dwn - base == pytest.approx(steps * B * T * F)  # the parent's forward on the new rows
    replace = cost.point_cost(finetune("reg.method=replace", "reg.coeff=0.5")).train_flops
    assert replace == pytest.approx(base)  # replay rows take the place of new rows


def test_a_tokens_per_param_point_trains_tpp_times_n_tokens():
    n = model_lib.paper_param_count(config_lib.ModelConfig(**MODEL))
    assert n == 12 * MODEL["L"] * MODEL["D"] ** 2 + MODEL["D"] * V
    tpp = B * T  # TPP x N is then a whole number of steps
    cfg = config_lib.from_dict(PRETRAIN, ["stop.num_tokens_train=null", f"stop.tokens_per_param={tpp}"])
    c = cost.point_cost(cfg)
    assert c.tokens == tpp * n and c.length == "fixed" and c.num_params == n
    assert "tokens_per_param" in c.basis and c.train_flops == pytest.approx(tpp * n * C)
    odd = cost.point_cost(cfg.replace({"stop.tokens_per_param": 20}))  # rounded up to whole steps
    assert 20 * n <= odd.tokens < 20 * n + B * T and odd.tokens % (B * T) == 0


def test_epochs_read_the_sidecar_and_a_missing_file_is_unknown(tmp_path):
    path = write_token_file(tmp_path / "d.bin", 1000, vocab_size=V)
    cfg = config_lib.from_dict(
        PRETRAIN, [f"data.path={path}", "stop.num_tokens_train=null", "stop.num_epochs=2"]
    )
    train_rows = 1000 // T - 8  # rows less the 8 validation rows
    assert cost.point_cost(cfg).tokens == math.ceil(2 * train_rows / B) * B * T
    gone = cost.point_cost(cfg.replace({"data.path": str(tmp_path / "absent.bin")}))
    assert gone.tokens is None and gone.train_flops is None
    assert gone.length == "unknown" and gone.basis.startswith("unknown (token file missing)")
    assert gone.flops_per_token == pytest.approx(C)  # the rate is known without the length
    unbounded = cost.point_cost(cfg.replace({"stop.num_epochs": None, "stop.target_loss": 2.0}))
    assert unbounded.tokens is None and unbounded.length == "unbounded"
    capped = cost.point_cost(cfg.replace({"stop.patience": 3}))
    assert capped.length == "upper bound" and capped.tokens == cost.point_cost(cfg).tokens


def test_evaluation_counts_every_set_at_every_evaluation():
    cfg = finetune()  # 4 steps, evaluated every 2: before step 1 and after steps 2 and 4
    evals, rows = 3, 8 + 8  # its valid set and the parent's (prev)
    assert cost.point_cost(cfg).eval_flops == pytest.approx(evals * rows * T * F)
    kl = cost.point_cost(cfg.replace({"log.eval_kl": True})).eval_flops  # parent's side cached once
    assert kl == pytest.approx((evals + 1) * rows * T * F)


def spec(tmp_path, data_path, new_path) -> dict:
    return {
        "out": str(tmp_path / "out"),
        "stages": {
            "pretrain": {
                "base": PRETRAIN,
                "set": {"data.path": str(data_path)},
                "grid": {"opt.lr": [1e-3, 3e-3]},
            },
            "finetune": {
                "base": FINETUNE,
                "after": "pretrain",
                "set": {"data.path": str(new_path)},
                "grid": {"method": ["standard", "kl_self", "ntp_real"]},
            },
        },
    }


def test_the_table_sums_its_points_and_a_finetune_takes_its_parents_architecture(tmp_path):
    old, new = (write_token_file(tmp_path / f"{n}.bin", 2000, vocab_size=V) for n in ("old", "new"))
    points = sweep.check(spec(tmp_path, old, new))
    per_point = cost.point_table(points)
    assert len(per_point) == 2 + 6 and per_point["tokens"].notna().all()
    assert set(per_point.loc[per_point["stage"] == "finetune", "tokens"]) == {4 * B * T}
    standard = per_point[per_point["point"].str.endswith("method=standard")]["train_flops"]
    assert list(standard) == pytest.approx([4 * B * T * C] * 2)  # D, L, V of the parent stage
    table = cost.cost_table(points, mfu=0.5, peak_tflops=100)
    stages, total = table[table["stage"] != "total"], table[table["stage"] == "total"].iloc[0]
    assert list(stages["stage"]) == ["pretrain", "finetune"] and list(stages["points"]) == [2, 6]
    for column in ("points", "tokens", "train_flops", "eval_flops", "accel_hours"):
        assert total[column] == pytest.approx(stages[column].sum())
    for stage, row in stages.set_index("stage").iterrows():
        assert row["train_flops"] == pytest.approx(
            per_point[per_point["stage"] == stage]["train_flops"].sum()
        )
    flops = total["train_flops"] + total["eval_flops"]
    assert total["accel_hours"] == pytest.approx(flops / (0.5 * 100e12) / 3600)


def test_cli_dry_run_prints_the_cost_table(tmp_path, capsys):
    old = write_token_file(tmp_path / "old.bin", 2000, vocab_size=V)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path, old, tmp_path / "absent.bin"), sort_keys=False))
    assert cli_main(["sweep", str(path), "--dry-run", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "MFU 0.5 x 989 TFLOP/s peak (H100 SXM, dense bf16)" in out
    rows: dict[str, str] = {}
    for line in out.splitlines()[len(sweep.plan(path)) :]:  # after the list of points
        rows.setdefault(line.split()[0], line)
    assert {"pretrain", "finetune", "total"} <= set(rows) and "accel_hours" in out
    assert rows["pretrain"].split()[1:3] == ["2", "768"]  # 2 points of 6 x B T tokens each
    assert cli_main(["sweep", str(path), "--dry-run", "--mfu", "0"]) == 2  # a user error
