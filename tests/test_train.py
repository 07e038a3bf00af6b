"""End-to-end training on synthetic token files: learning, reproducibility, every stop rule, the
run folder's files and states, failures, schedules, mixing, and resuming after a kill.

Every run uses the same tiny model and batch shapes (D=32, L=1, V=64, T=16, B=8) so that the
compiled train step is reused; only the optimizer's constants differ between some runs.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib import config, runs
from forgetting_lib.engine import checkpoint, data as data_lib, model, step as step_lib, train
from forgetting_lib.runs import RunFolderError

from tokenfiles import write_token_file

T, B, V = 16, 8, 64
TOKENS_PER_STEP = B * T
TIMING = {"train_time_s", "eval_time_s", "sample_time_s", "tokens_per_s"}
N_ROWS, N_VALID = 256, 16  # the main file: 256 rows of T, 16 of them held out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    main = write_token_file(folder / "main.bin", N_ROWS * T, vocab_size=V, dataset_token=1, seed=0)
    mix = write_token_file(folder / "mix.bin", 64 * T, vocab_size=V, dataset_token=2, seed=1)
    return {"main": main, "mix": mix}


def make_cfg(files, **overrides) -> config.Config:
    base = {
        "run": {"seed": 0},
        "data": {
            "path": str(files["main"]),
            "T": T,
            "batch_size": B,
            "valid_tokens": N_VALID * T,
            "eval_batch_size": 8,
        },
        "model": {"D": 32, "L": 1, "H": 16, "V": V, "dtype": "float32"},
        "opt": {"lr": 1e-2, "warmup_tokens": 0},
        "stop": {"num_tokens_train": 100 * TOKENS_PER_STEP - 100},  # ceil -> 100 steps
        "log": {
            "every_tokens": 10 * TOKENS_PER_STEP,
            "checkpoint_every_tokens": 20 * TOKENS_PER_STEP,
            "progress": False,
        },
    }
    return config.load(base, list(overrides.items()))


def losses_only(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def base_run(files, tmp_path_factory):
    """The reference run: 100 steps, an eval every 10, a checkpoint every 20."""
    out = tmp_path_factory.mktemp("runs") / "base"
    cfg = make_cfg(files)
    result = train.train_and_evaluate(cfg, out)
    return cfg, out, result


def test_tiny_model_overfits_tiny_dataset(base_run):
    _, out, result = base_run
    rows = runs.read_metrics(out)
    assert result.status == "finished"
    assert math.log(V) < rows[0]["valid_ntp"] < math.log(V) + 0.8  # ~ln V at init
    assert rows[0]["train_ntp"] is None
    # The cycle is a deterministic bigram except the first text token of a row (15 possible
    # starts): the floor is ln(15)/15 ~ 0.18 nats/token.
    assert result.final["train_ntp"] < 0.15 * math.log(V)
    assert result.final["valid_ntp"] < 0.15 * math.log(V)
    assert result.final["valid_ntp_h2"] < 0.05  # the second half of each row is fully determined
    valid = [r["valid_ntp"] for r in rows]
    assert valid[-1] < valid[1] < valid[0]


def test_metrics_and_summary_files(base_run):
    cfg, out, result = base_run
    rows = runs.read_metrics(out)
    assert [r["step"] for r in rows] == list(range(0, 101, 10))  # step 0 + one row per eval
    assert [r["tokens"] for r in rows] == [s * TOKENS_PER_STEP for s in range(0, 101, 10)]
    expected = {"step", "tokens", "epoch", "valid_ntp", "valid_ntp_h2", "weight_norm", "train_ntp", "lr"}
    assert all(expected | {"train_time_s", "eval_time_s", "tokens_per_s"} <= set(r) for r in rows)
    assert rows[-1]["epoch"] == pytest.approx(100 * B / (N_ROWS - N_VALID))
    assert all(r["lr"] == pytest.approx(1e-2) for r in rows)  # constant, no warm-up
    times = [r["train_time_s"] for r in rows]
    assert times == sorted(times) and times[0] == 0
    summary = runs.read_summary(out)
    assert summary["status"] == "finished" and summary["stop_reason"] == "num_tokens_train"
    assert (
        summary["step"] == result.step == 100 and summary["tokens"] == result.tokens == 100 * TOKENS_PER_STEP
    )
    assert summary["final"] == rows[-1] == result.final
    assert summary["num_params"] == model.param_formula(cfg.model)
    assert summary["best_valid_ntp"] == min(r["valid_ntp"] for r in rows[1:])
    assert config.load(out / runs.CONFIG) == cfg  # the resolved config, loadable as is
    meta = checkpoint.read_meta(out / runs.CHECKPOINT)
    assert meta["tracker"]["step"] == 100 and meta["split_seed"] == cfg.data.split_seed
    frame = result.metrics()
    assert len(frame) == len(rows) and (frame["status"] == "finished").all()


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(base_run, files, tmp_path):
    cfg, out, _ = base_run
    train.train_and_evaluate(cfg, tmp_path / "again")
    assert losses_only(runs.read_metrics(tmp_path / "again")) == losses_only(runs.read_metrics(out))
    train.train_and_evaluate(
        cfg.replace({"run.seed": 1, "stop.num_tokens_train": 10 * TOKENS_PER_STEP}), tmp_path / "other"
    )
    other = runs.read_metrics(tmp_path / "other")
    assert other[0]["valid_ntp"] != runs.read_metrics(out)[0]["valid_ntp"]  # another init


def test_finished_run_folder_is_refused_without_resume_or_overwrite(base_run, tmp_path):
    cfg, out, result = base_run
    before = (out / runs.METRICS).read_text()
    with pytest.raises(RunFolderError, match="finished run.*resume=True.*overwrite=True"):
        train.train_and_evaluate(cfg, out)
    again = train.train_and_evaluate(cfg, out, resume=True)  # nothing to do: returned as is
    assert (again.status, again.stop_reason, again.step, again.final) == (
        "finished",
        "num_tokens_train",
        100,
        result.final,
    )
    assert (out / runs.METRICS).read_text() == before
    with pytest.raises(RunFolderError, match=r"different config \(opt\.lr differ"):
        train.train_and_evaluate(cfg.replace({"opt.lr": 2e-2}), out, resume=True)
    # a display-only difference is not a different run
    assert train.train_and_evaluate(cfg.replace({"log.progress": True}), out, resume=True).step == 100


def test_overwrite_starts_again(base_run, tmp_path):
    cfg, out, _ = base_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "stale.txt").write_text("left by the old run")
    short = cfg.replace({"stop.num_tokens_train": 10 * TOKENS_PER_STEP})
    result = train.train_and_evaluate(short, copy, overwrite=True)
    assert result.step == 10 and not (copy / "stale.txt").exists()
    assert losses_only(runs.read_metrics(copy)) == losses_only(runs.read_metrics(out)[:2])


@pytest.mark.parametrize(
    "rule, value, steps",
    [
        ("num_tokens_train", 25 * TOKENS_PER_STEP + 5, 26),  # ceil(tokens / (B T))
        ("tokens_per_param", 0.1, math.ceil(0.1 * (12 * 32**2 + 32 * V) / TOKENS_PER_STEP)),  # paper N
        ("num_epochs", 0.5, math.ceil(0.5 * (N_ROWS - N_VALID) / B)),
    ],
)
def test_length_rules_stop_at_the_exact_step(files, tmp_path, rule, value, steps):
    cfg = make_cfg(files, **{"stop.num_tokens_train": None, f"stop.{rule}": value})
    result = train.train_and_evaluate(cfg, tmp_path / rule)
    rows = runs.read_metrics(tmp_path / rule)
    assert (result.status, result.stop_reason, result.step) == ("finished", rule, steps)
    assert rows[-1]["step"] == steps and result.tokens == steps * TOKENS_PER_STEP
    assert [r["step"] for r in rows] == [*range(0, steps, 10), steps]  # the last interval is short
    assert runs.read_summary(tmp_path / rule)["stop_reason"] == rule
    if rule == "num_epochs":
        assert rows[-1]["epoch"] == pytest.approx(value)


def test_target_loss_stops_at_the_first_eval_below_it(files, tmp_path):
    cfg = make_cfg(
        files,
        **{
            "stop.num_tokens_train": 2000 * TOKENS_PER_STEP,
            "stop.target_loss": 1.0,
            "log.every_tokens": 5 * TOKENS_PER_STEP,
        },
    )
    result = train.train_and_evaluate(cfg, tmp_path / "target")
    rows = runs.read_metrics(tmp_path / "target")
    assert result.stop_reason == "target_loss" and result.status == "finished"
    assert rows[-1]["valid_ntp"] <= 1.0 < min(r["valid_ntp"] for r in rows[:-1])
    assert result.step == rows[-1]["step"] < 2000


def test_train_time_budget_stops_the_run(files, tmp_path):
    budget = 0.3
    cfg = make_cfg(
        files,
        **{
            "stop.num_tokens_train": None,
            "stop.train_time_s": budget,
            "log.every_tokens": 10**6 * TOKENS_PER_STEP,
        },
    )
    result = train.train_and_evaluate(cfg, tmp_path / "time")
    rows = runs.read_metrics(tmp_path / "time")
    summary = runs.read_summary(tmp_path / "time")
    assert result.stop_reason == "train_time_s" and result.status == "finished"
    # the budget is checked after every step, not only at evaluations
    assert len(rows) == 2 and 0 < result.step < 10**6
    assert budget <= summary["train_time_s"] < budget + 1.0


def test_patience_stops_after_evals_without_improvement(files, tmp_path):
    # lr=1e-9 leaves float32 weights (almost) unchanged: the validation loss stops improving
    patience = 2
    cfg = make_cfg(
        files,
        **{
            "opt.lr": 1e-9,
            "stop.num_tokens_train": 100 * TOKENS_PER_STEP,
            "stop.patience": patience,
            "log.every_tokens": 2 * TOKENS_PER_STEP,
        },
    )
    result = train.train_and_evaluate(cfg, tmp_path / "patience")
    assert result.stop_reason == "patience" and result.status == "finished"
    valid = [r["valid_ntp"] for r in runs.read_metrics(tmp_path / "patience")[1:]]  # after training
    assert len(valid) > patience and min(valid[-patience:]) >= min(valid[:-patience])
    # and it did not stop earlier: every earlier window of `patience` evals had an improvement
    for end in range(patience + 1, len(valid)):
        assert min(valid[end - patience : end]) < min(valid[: end - patience])


def test_diverging_run_fails_naming_the_step(files, tmp_path):
    cfg = make_cfg(files, **{"opt.lr": 1e30, "stop.num_tokens_train": 20 * TOKENS_PER_STEP})
    result = train.train_and_evaluate(cfg, tmp_path / "nan")
    summary = runs.read_summary(tmp_path / "nan")
    assert result.status == "failed" == summary["status"]
    assert result.stop_reason == summary["stop_reason"]
    first_bad = int(result.stop_reason.removeprefix("non_finite_loss at step "))
    assert 1 <= first_bad <= 10
    assert [r["step"] for r in runs.read_metrics(tmp_path / "nan")] == [0]  # no row of NaNs
    assert checkpoint.latest(tmp_path / "nan" / runs.CHECKPOINT) is None  # none was due yet


def poison_step_from(monkeypatch, bad_step: int) -> None:
    """Make the train step report a NaN loss from the `bad_step`-th step of this session on."""
    original = train.compile_all

    def compile_all(setup, *args):
        seconds = original(setup, *args)
        step_fn, count = setup.compiled["step"], [0]

        def poisoned(*a):
            trainable, opt_state, stats = step_fn(*a)
            count[0] += 1
            if count[0] >= bad_step:
                stats = {**stats, "ntp": jnp.float32(np.nan)}
            return trainable, opt_state, stats

        setup.compiled["step"] = poisoned
        return seconds

    monkeypatch.setattr(train, "compile_all", compile_all)


def test_nan_after_a_checkpoint_keeps_it_loadable_and_resumable(base_run, monkeypatch, tmp_path):
    cfg, out, _ = base_run
    with monkeypatch.context() as m:
        poison_step_from(m, 25)
        result = train.train_and_evaluate(cfg, tmp_path / "nan")
    assert (result.status, result.stop_reason) == ("failed", "non_finite_loss at step 25")
    assert runs.read_summary(tmp_path / "nan")["status"] == "failed"
    assert checkpoint.read_meta(tmp_path / "nan" / runs.CHECKPOINT)["tracker"]["step"] == 20
    # the checkpoint before the divergence is intact: resuming continues exactly as the base run
    resumed = train.train_and_evaluate(cfg, tmp_path / "nan", resume=True)
    assert resumed.status == "finished"
    assert losses_only(runs.read_metrics(tmp_path / "nan")) == losses_only(runs.read_metrics(out))


def test_warmup_is_linear_and_cosine_reaches_zero(files, tmp_path):
    peak, warmup, total = 1e-2, 10, 40
    cfg = make_cfg(
        files,
        **{
            "opt.schedule": "cosine",
            "opt.warmup_tokens": warmup * TOKENS_PER_STEP,
            "stop.num_tokens_train": total * TOKENS_PER_STEP,
            "log.every_tokens": 2 * TOKENS_PER_STEP,
        },
    )
    train.train_and_evaluate(cfg, tmp_path / "cosine")
    rows = runs.read_metrics(tmp_path / "cosine")[1:]
    lr = {r["step"]: r["lr"] for r in rows}  # the lr of the row's last step (count = step - 1)
    for s in range(2, warmup + 1, 2):
        assert lr[s] == pytest.approx(peak * s / warmup, rel=1e-6)  # linear ramp to the peak
    after = [lr[s] for s in range(warmup, total + 1, 2)]
    assert all(a > b for a, b in itertools.pairwise(after))  # then strictly decreasing
    span = total - warmup
    assert lr[total] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (span - 1) / span)), rel=1e-4)
    assert lr[total] < 0.01 * peak
    schedule = step_lib.lr_schedule(cfg.opt, warmup, total)
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-12)
    assert float(schedule(0)) == pytest.approx(peak / warmup)


def test_mixing_reports_mix_metrics_and_learns_both(files, tmp_path):
    cfg = make_cfg(
        files,
        **{
            "mix.path": str(files["mix"]),
            "mix.fraction": 0.25,
            "mix.valid_tokens": 8 * T,
            "stop.num_tokens_train": 60 * TOKENS_PER_STEP,
        },
    )
    result = train.train_and_evaluate(cfg, tmp_path / "mix")
    rows = runs.read_metrics(tmp_path / "mix")
    assert all("mix_ntp" in r and "mix_ntp_h2" in r for r in rows)
    assert result.final["mix_ntp"] < rows[0]["mix_ntp"] - 1.0  # the mixed-in data is learned too
    assert result.final["valid_ntp"] < rows[0]["valid_ntp"] - 1.0
    # epochs count the main rows only: 6 of each 8 rows
    assert rows[-1]["epoch"] == pytest.approx(60 * 6 / (N_ROWS - N_VALID))


def test_data_too_small_is_refused_naming_the_file(files, tmp_path):
    small = write_token_file(tmp_path / "small.bin", 20 * T, vocab_size=V)
    with pytest.raises(data_lib.DataError, match=r"small\.bin"):
        train.train_and_evaluate(make_cfg(files, **{"data.path": str(small)}), tmp_path / "small")


def test_auto_microbatches_terminates_for_small_batches():
    if jax.default_backend() != "cpu":
        pytest.skip("the per-slice search only runs on a CPU")

    def timeout(*_):
        raise TimeoutError("auto_microbatches did not return within 2 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        assert step_lib.auto_microbatches(64, 16) == 2  # 32 rows of 16 tokens per slice
        assert step_lib.auto_microbatches(8, 128, rows=4) == 2
        count = step_lib.auto_microbatches(B, T)  # 512 tokens need 32 rows > B = 8
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert count == 1


def test_microbatching_gives_the_same_training(base_run, files, tmp_path):
    cfg, out, _ = base_run
    sliced = cfg.replace({"data.microbatch_rows": 2, "stop.num_tokens_train": 20 * TOKENS_PER_STEP})
    train.train_and_evaluate(sliced, tmp_path / "micro")
    got, want = runs.read_metrics(tmp_path / "micro"), runs.read_metrics(out)[:3]
    for a, b in zip(got, want, strict=True):
        assert a["step"] == b["step"]
        assert a["valid_ntp"] == pytest.approx(b["valid_ntp"], abs=1e-4)


# ---------------------------------------------------------------- resuming after interruption


def test_resume_after_the_final_checkpoint_but_before_the_summary(base_run, tmp_path):
    """Killed between the final checkpoint and summary.json: resuming must not add a row."""
    cfg, out, _ = base_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / runs.SUMMARY).unlink()
    result = train.train_and_evaluate(cfg, copy, resume=True)
    assert result.status == "finished" and result.step == 100
    assert losses_only(runs.read_metrics(copy)) == losses_only(runs.read_metrics(out))


def test_resume_before_the_first_checkpoint_starts_over(base_run, tmp_path):
    cfg, out, _ = base_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / runs.SUMMARY).unlink()
    shutil.rmtree(copy / runs.CHECKPOINT)
    with open(copy / runs.METRICS, "a") as f:
        f.write('{"step": 30, "tok')  # a torn last line
    train.train_and_evaluate(cfg, copy, resume=True)
    assert losses_only(runs.read_metrics(copy)) == losses_only(runs.read_metrics(out))


CHILD = """
import os, signal, sys, time
from forgetting_lib.engine import checkpoint
from forgetting_lib import config
from forgetting_lib.engine import train
cfg, out, mode = config.load(sys.argv[1]), sys.argv[2], sys.argv[3]
save, write_json, saves = checkpoint.save, checkpoint.atomic_write_json, [0]

def slow_save(*args, **kwargs):  # leaves the parent time to kill us after the first checkpoint
    save(*args, **kwargs)
    saves[0] += 1
    time.sleep(0.5)

def torn_write_json(path, obj):  # killed inside the second save, before its meta.json exists
    if saves[0] == 1 and mode == "torn":
        os.kill(os.getpid(), signal.SIGKILL)
    write_json(path, obj)

checkpoint.save, checkpoint.atomic_write_json = slow_save, torn_write_json
train.train_and_evaluate(cfg, out)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["external", "torn"])
def test_killed_run_resumes_to_identical_metrics(base_run, tmp_path, mode):
    """SIGKILL a training process after its first checkpoint (from outside, or inside its
    second checkpoint write); resuming must reproduce the uninterrupted run's metrics exactly."""
    cfg, out, _ = base_run
    run_dir = tmp_path / "killed"
    config.dump(cfg, tmp_path / "cfg.yaml")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "cfg.yaml"), str(run_dir), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / runs.CHECKPOINT / checkpoint.META).exists():
            assert child.poll() is None or mode == "torn", child.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        if mode == "external":
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert runs.read_summary(run_dir) is None  # it really was interrupted
    killed_at = checkpoint.read_meta(run_dir / runs.CHECKPOINT)["tracker"]["step"]
    assert killed_at == 20 if mode == "torn" else killed_at in (20, 40, 60, 80)
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint.tmp-")]
    if mode == "torn":
        assert leftovers, "the second save should have left its temporary folder behind"
    # a torn temporary checkpoint claiming to be later must be ignored as well
    fake = run_dir / ".checkpoint.tmp-999999"
    fake.mkdir(exist_ok=True)
    (fake / checkpoint.ARRAYS).write_bytes(b"PK\x03\x04 torn")
    (fake / checkpoint.META).write_text(json.dumps({"tracker": {"step": 60}}))
    result = train.train_and_evaluate(cfg, run_dir, resume=True)
    assert result.status == "finished" and result.step == 100
    assert not list(run_dir.glob(".checkpoint.tmp-*"))  # the killed save's leftovers are removed
    assert losses_only(runs.read_metrics(run_dir)) == losses_only(runs.read_metrics(out))
    assert checkpoint.read_meta(run_dir / runs.CHECKPOINT)["tracker"]["step"] == 100


def test_resume_accepts_a_run_written_before_a_config_field_existed(base_run, tmp_path):
    """A stored config lacking a newer key (at its default) still resumes: nothing is orphaned."""
    cfg, out, _ = base_run
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    raw = runs.read_config(copy)
    del raw["parent"]["dataset_token"]
    config.dump(raw, copy / runs.CONFIG)
    assert train.train_and_evaluate(cfg, copy, resume=True).status == "finished"
