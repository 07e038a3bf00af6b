"""One writer per run folder, sweep output and token file, checked with real second processes.

A holder process trains slowly (a sleep after each evaluation) while this process, or the CLI in
another process, tries to write the same folder; then the holder is killed with SIGKILL and the
folder must be usable again at once (the kernel drops a dead process's flock).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forgetting_lib import config, locks, runs
from forgetting_lib.__main__ import main as cli_main
from forgetting_lib.engine import train
from forgetting_lib.experiments import sweep
from forgetting_lib.locks import LockedError

from tokenfiles import write_token_file

T, B, V = 16, 4, 64
STEPS, EVAL_EVERY = 24, 4


def tiny(data: Path, steps: int = STEPS, every: int = EVAL_EVERY) -> dict:
    return {
        "data": {"path": str(data), "T": T, "batch_size": B, "valid_tokens": 8 * T, "microbatch_rows": B},
        "model": {"D": 32, "L": 1, "H": 16, "V": V, "dtype": "float32"},
        "opt": {"lr": 3e-3, "warmup_tokens": 0},
        "stop": {"num_tokens_train": steps * B * T},
        "log": {"every_tokens": every * B * T, "checkpoint_every_tokens": every * B * T, "progress": False},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_token_file(tmp_path_factory.mktemp("lock_data") / "d.bin", 4000, vocab_size=V, seed=0)


# A writer that holds its run folder for a while: it sleeps `pause` seconds after each evaluation.
SLOW_TRAIN = """
import sys, time
from forgetting_lib import config
from forgetting_lib.engine import train
cfg = config.load(sys.argv[1])
train.train_and_evaluate(cfg, sys.argv[2], resume=True, on_eval=lambda row: time.sleep(float(sys.argv[3])))
"""


def start_until(argv: list[str], ready, what: str) -> subprocess.Popen:
    """Start `argv` and wait (up to 120 s) until `ready()`; fails with the process's output if it
    exits first."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready():
        assert child.poll() is None, child.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, f"the process never {what}"
        time.sleep(0.05)
    return child


def start_holder(params: Path, run_dir: Path, pause: float = 3.0) -> subprocess.Popen:
    """A training process that has taken the folder's lock (waits until it has)."""
    argv = [sys.executable, "-c", SLOW_TRAIN, str(params), str(run_dir), str(pause)]
    child = start_until(argv, lambda: locks.read_holder(run_dir / runs.LOCK) is not None, "took the lock")
    assert locks.read_holder(run_dir / runs.LOCK)["pid"] == child.pid
    return child


def kill(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_holder_frees_the_folder(data, tmp_path, capsys):
    params, run_dir = tmp_path / "p.yaml", tmp_path / "run"
    params.write_text(yaml.safe_dump(tiny(data)))
    child = start_holder(params, run_dir)
    try:
        cfg = config.load(params)
        with pytest.raises(LockedError, match=rf"run folder {run_dir} is in use by pid {child.pid} on "):
            train.train_and_evaluate(cfg, run_dir, resume=True)
        # the CLI, in a third process: --resume and --overwrite are both refused, in one line
        for flag in ("--resume", "--overwrite"):
            proc = subprocess.run(
                [sys.executable, "-m", "forgetting_lib", "train", str(params), "--out", str(run_dir), flag],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.startswith("error: run folder") and f"pid {child.pid}" in proc.stderr
            assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert (run_dir / runs.CONFIG).exists()  # --overwrite deleted nothing
        assert child.poll() is None
    finally:
        kill(child)
    assert child.returncode == -signal.SIGKILL and not runs.is_finished(run_dir)
    assert (run_dir / runs.LOCK).exists()  # left by the killed holder; its flock is gone
    result = train.train_and_evaluate(cfg, run_dir, resume=True)
    assert result.status == "finished"
    steps = [r["step"] for r in runs.read_metrics(run_dir)]
    assert steps == list(range(0, STEPS + 1, EVAL_EVERY))  # one row per evaluation, none twice
    assert not (run_dir / runs.LOCK).exists()  # released and removed


@pytest.mark.slow
def test_two_sweeps_on_one_spec_the_second_refuses_and_a_shared_point_is_waited_for(data, tmp_path):
    base = tiny(data, steps=400, every=50)  # a few seconds: the second sweep starts meanwhile
    spec = {"out": str(tmp_path / "a"), "base": base, "grid": {"run.seed": [0]}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    point = tmp_path / "a" / "runs" / "seed=0"
    argv = [sys.executable, "-m", "forgetting_lib", "sweep", str(tmp_path / "spec.yaml"), "--no-notebook"]
    holder = start_until(argv, (point / runs.METRICS).exists, "started training the point")
    try:
        assert cli_main(["sweep", str(tmp_path / "spec.yaml"), "--no-notebook"]) == 2
        # another spec sharing the stage folder waits for the point, then finds it done
        shared = {"base": base, "grid": {"run.seed": [0]}, "out": str(tmp_path / "a" / "runs")}
        other = {"out": str(tmp_path / "b"), "stages": {"runs": shared}}
        table = sweep.run_sweep(other, notebook=False, log=lambda _: None)
        assert holder.wait(timeout=120) == 0, holder.communicate()[0].decode()[-3000:]
    finally:
        kill(holder)
    assert list(table["status"]) == ["done"]
    steps = [r["step"] for r in runs.read_metrics(point)]
    assert steps == list(range(0, 401, 50))  # trained once
    assert not (tmp_path / "a" / sweep.SWEEP_LOCK).exists()


def test_a_lock_is_exclusive_within_a_process_too_and_names_its_holder(tmp_path):
    lock = tmp_path / "x.lock"
    with locks.hold(lock, "thing X"):
        holder = locks.read_holder(lock)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert locks.is_held(lock)
        with pytest.raises(LockedError, match=rf"thing X is in use by pid {os.getpid()} on "):
            with locks.hold(lock, "thing X"):
                pass
    assert not lock.exists() and not locks.is_held(lock)


def test_without_flock_the_record_is_the_lock_and_a_dead_holder_is_stale(tmp_path, monkeypatch):
    def no_flock(fd):
        raise OSError(errno.ENOLCK, "no locks on this filesystem")

    monkeypatch.setattr(locks, "_flock", no_flock)
    lock = tmp_path / "x.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with locks.hold(lock, "thing"):  # a holder of this host that is gone: taken over
        assert locks.read_holder(lock)["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(LockedError, match=f"pid {os.getppid()}"):
        with locks.hold(lock, "thing"):
            pass
    lock.write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(LockedError, match=f"if that process is gone, delete {lock}"):
        with locks.hold(lock, "thing"):
            pass


def test_binarize_refuses_a_second_writer_of_one_token_file(small_tokenizer, small_corpus_dir, tmp_path):
    from forgetting_lib.prep.binarize import binarize

    out = tmp_path / "x.bin"
    with locks.hold(out.with_name(".x.bin.lock"), "token file x"):
        with pytest.raises(LockedError, match="in use"):
            binarize(f"files:{small_corpus_dir}/*.txt", small_tokenizer, out, dataset_id=0)
    assert not out.exists()
