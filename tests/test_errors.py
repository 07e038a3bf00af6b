"""No silent failures: every refusal is one line naming the file or key and the fix (exit 2, no
traceback unless --debug), a failed run exits 1 and says why, checks catch mismatched token
files and architectures, and temporaries and full disks never cost saved work."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from forgetting_lib import config, runs
from forgetting_lib.__main__ import main as cli_main
from forgetting_lib.config import ConfigError
from forgetting_lib.engine import checkpoint, data as data_lib, train
from forgetting_lib.engine.finetune import FinetuneError
from forgetting_lib.prep.binarize import sidecar_path
from forgetting_lib.runs import RunFolderError

from finetune_fixtures import B, T, world  # noqa: F401
from tokenfiles import write_token_file

V = 64


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def pretrain_params(tmp_path: Path, data: Path, **extra) -> Path:
    raw = {
        "data": {"path": str(data), "T": 16, "batch_size": 4, "valid_tokens": 128, "microbatch_rows": 4},
        "model": {"D": 32, "L": 1, "H": 16, "V": V, "dtype": "float32"},
        "opt": {"lr": 3e-3, "warmup_tokens": 0},
        "stop": {"num_tokens_train": 8 * 64},
        "log": {"every_tokens": 4 * 64, "progress": False},
        **extra,
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tokens(tmp_path) -> Path:
    return write_token_file(tmp_path / "d.bin", 3000, vocab_size=V, seed=0)


# ---- text and YAML a user wrote ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["tokenizer", "binarize"])
def test_a_corpus_file_that_is_not_utf8_names_the_byte_and_line(command, tmp_path, capsys, small_tokenizer):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\nsecond line\nse\xf1or\n".encode("latin-1"))
    args = {
        "tokenizer": ["tokenizer", "--corpus", f"files:{bad}", "--out", str(tmp_path / "tok"),
                      "--vocab-size", "300"],
        "binarize": ["binarize", "--corpus", f"files:{bad}", "--tokenizer", str(small_tokenizer.directory),
                     "--out", str(tmp_path / "x.bin"), "--dataset-id", "0"],
    }[command]  # fmt: skip
    assert cli_main(args) == 2
    one_line_error(capsys, str(bad), "byte 25 (line 3) is not UTF-8", "iconv")
    assert not (tmp_path / "x.bin").exists() and not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("data:\n  T: 16\n  batch_size: [4\n", ["params.yaml:4:1", "not valid YAML"]),
        (
            "data: !!python/object/apply:os.system ['echo hi']\n",
            ["params.yaml:1:7", "python/object", "refused"],
        ),
        ("data:\n  T: 16\n\tbatch_size: 4\n", ["params.yaml:3:1", "not valid YAML"]),
    ],
    ids=["unclosed-bracket", "python-tag", "tab"],
)
def test_a_malformed_parameter_file_names_line_and_column(text, needles, tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(text)
    assert cli_main(["train", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, *needles)
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("data: [\n")
    with pytest.raises(ConfigError, match="params.yaml:2:1"):
        cli_main(["--debug", "train", str(tmp_path / "params.yaml")])
    monkeypatch.setenv("FORGETTING_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli_main(["train", str(tmp_path / "params.yaml")])


def test_an_override_value_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'opt.lr=\[1,': the value is not valid YAML"):
        config.load({}, ["opt.lr=[1,"])


def test_overrides_may_follow_the_options_and_junk_is_named(tokens, tmp_path, capsys):
    params = pretrain_params(tmp_path, tokens)
    assert cli_main(["train", str(params), "--out", str(tmp_path / "run"), "stop.num_tokens_train=256"]) == 0
    assert runs.read_summary(tmp_path / "run")["tokens"] == 256
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", str(params), "--out", str(tmp_path / "run2"), "--bogus"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus (train's dotted overrides look like" in capsys.readouterr().err


def test_sweep_dry_run_checks_every_point_as_the_real_run_does(tokens, tmp_path, capsys):
    spec = {
        "out": str(tmp_path / "s"),
        "base": str(pretrain_params(tmp_path, tokens)),
        "grid": {"opt.lrr": [1e-3]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert cli_main(["sweep", str(tmp_path / "spec.yaml"), "--dry-run"]) == 2
    one_line_error(capsys, "sweep point runs/lrr=0.001", "unknown config key opt.lrr; did you mean opt.lr?")


# ---- runs refused, failed, damaged -------------------------------------------------------------


def test_a_refused_run_leaves_no_folder_and_the_corrected_command_runs(tokens, tmp_path, capsys):
    params, out = pretrain_params(tmp_path, tmp_path / "missing.bin"), tmp_path / "run"
    assert cli_main(["train", str(params), "--out", str(out)]) == 2
    one_line_error(capsys, "missing.bin does not exist")
    assert not out.exists()
    assert cli_main(["train", str(params), "--out", str(out), "data.T=100000", f"data.path={tokens}"]) == 2
    one_line_error(capsys, "rows of T=100000")
    assert not out.exists()
    # a folder an older version left with only a config (nothing computed) is started afresh
    out.mkdir()
    (out / runs.CONFIG).write_text(yaml.safe_dump({"data": {"path": "elsewhere.bin"}}))
    assert cli_main(["train", str(params), "--out", str(out), f"data.path={tokens}"]) == 0
    assert runs.is_finished(out) and runs.read_config(out)["data"]["path"] == str(tokens)


def test_a_diverged_run_exits_1_and_keeps_the_last_finite_row(tokens, tmp_path, capsys):
    params, out = pretrain_params(tmp_path, tokens), tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", str(params), "--out", str(out), "opt.lr=1e30"])
    assert exit_.value.code == 1
    err = one_line_error(capsys, f"run {out} failed: non_finite_loss at step", "--overwrite")
    summary = runs.read_summary(out)
    step = int(err.split("non_finite_loss at step ")[1].split(";")[0])
    assert summary["status"] == "failed" and summary["failed_at_step"] == step >= 1
    assert summary["final"]["step"] == 0 and math.isfinite(summary["final"]["valid_ntp"])
    assert all(math.isfinite(v) for v in summary["final"].values() if isinstance(v, float))


def test_a_failed_sweep_point_says_why(tokens, tmp_path):
    from forgetting_lib.experiments import sweep

    spec = {
        "out": str(tmp_path / "s"),
        "base": str(pretrain_params(tmp_path, tokens)),
        "grid": {"opt.lr": [1e30]},
    }
    table = sweep.run_sweep(spec, notebook=False, log=lambda _: None)
    assert table["status"].tolist() == ["failed"]
    assert table["error"].iloc[0].startswith("ended with status failed: non_finite_loss at step ")


def test_a_damaged_checkpoint_meta_is_named(tokens, tmp_path, capsys):
    params, out = pretrain_params(tmp_path, tokens, log={"every_tokens": 256, "checkpoint_every_tokens": 256,
                                                         "progress": False}), tmp_path / "run"  # fmt: skip
    assert cli_main(["train", str(params), "--out", str(out)]) == 0
    (out / runs.SUMMARY).unlink()  # as if killed after the last checkpoint
    (out / runs.CHECKPOINT / checkpoint.META).write_text('{"tracker": ')
    assert cli_main(["train", str(params), "--out", str(out), "--resume"]) == 2
    one_line_error(capsys, str(out / runs.CHECKPOINT / checkpoint.META), "is damaged", "--overwrite")


def test_a_damaged_metrics_line_is_reported_not_dropped(tokens, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", str(pretrain_params(tmp_path, tokens)), "--out", str(out)]) == 0
    lines = (out / runs.METRICS).read_text().splitlines()
    torn = lines + [lines[-1][:20]]  # a run killed mid-write: the torn last line is ignored
    (out / runs.METRICS).write_text("\n".join(torn) + "\n")
    assert len(runs.load_runs(out)) == len(lines)
    lines[1] = lines[1][:20]  # damage in the middle: later rows exist, so it is reported
    (out / runs.METRICS).write_text("\n".join(lines) + "\n")
    with pytest.raises(
        RunFolderError, match=rf"metrics.jsonl:2: not a metrics row .* {len(lines) - 2} rows follow"
    ):
        runs.load_runs(out)


# ---- token files and parents that do not fit -------------------------------------------------------


def other_tokenizer(path: Path) -> Path:
    """Mark a token file as made by another tokenizer (its sidecar's fingerprint)."""
    side = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**side, "tokenizer_fingerprint": "0ther" * 8}))
    return path


def test_finetune_data_from_another_tokenizer_is_refused(world, tmp_path):  # noqa: F811
    alien = other_tokenizer(write_token_file(tmp_path / "alien.bin", 200 * T, vocab_size=V, dataset_token=2))
    cfg = world.child_config({"data.path": str(alien)})
    with pytest.raises(
        data_lib.DataError,
        match=r"alien.bin was made with tokenizer 0ther0ther0t .* but the parent run .* uses tokenizer synth",
    ):
        train.train_and_evaluate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mix_data_from_another_tokenizer_is_refused(tokens, tmp_path):
    alien = other_tokenizer(write_token_file(tmp_path / "alien.bin", 3000, vocab_size=V, dataset_token=2))
    mix = [("mix.path", str(alien)), ("mix.fraction", 0.25), ("mix.valid_tokens", 128)]
    cfg = config.load(pretrain_params(tmp_path, tokens), mix)
    with pytest.raises(
        data_lib.DataError, match=r"alien.bin was made with tokenizer 0ther.* this run's training data"
    ):
        train.train_and_evaluate(cfg, tmp_path / "run")


def test_parent_data_replaced_by_another_tokenizers_file_is_refused(world, tmp_path):  # noqa: F811
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(world.parent, parent)
    copy = tmp_path / "old.bin"
    shutil.copy(world.old, copy)
    shutil.copy(sidecar_path(world.old), sidecar_path(copy))
    stored = yaml.safe_load((parent / runs.CONFIG).read_text())
    stored["data"]["path"] = os.path.relpath(copy, parent)
    (parent / runs.CONFIG).write_text(yaml.safe_dump(stored))
    other_tokenizer(copy)  # re-binarized with another tokenizer after the parent trained
    with pytest.raises(data_lib.DataError, match=r"old.bin was made with tokenizer 0ther.* the parent run"):
        train.train_and_evaluate(world.child_config(parent=parent), tmp_path / "run")


def test_an_architecture_override_on_a_finetune_names_both_values(world, tmp_path):  # noqa: F811
    with pytest.raises(
        FinetuneError, match=r"model.D=64 \(parent: 32\), model.L=3 \(parent: 2\): a finetune keeps"
    ):
        train.train_and_evaluate(world.child_config({"model.D": 64, "model.L": 3}), tmp_path / "run")
    same = world.child_config({"model.D": 32, "model.H": 16})  # equal to the parent's: fine
    assert train.resolve(same).model.D == 32
    # a Config round-tripped through a dict (all keys set) of the resolved run is accepted too
    resolved = train.resolve(world.child_config())
    assert train.resolve(config.load(resolved.to_dict())).model.D == 32


# ---- temporaries and full disks -----------------------------------------------------------------


def test_stale_temporaries_are_removed_on_resume(tokens, tmp_path):
    params, out = pretrain_params(tmp_path, tokens), tmp_path / "run"
    cfg = config.load(params, ["stop.num_tokens_train=1024", "log.checkpoint_every_tokens=256"])
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the second checkpoint's array write
        original, calls = np.savez, [0]

        def interrupted(*a, **kw):
            calls[0] += 1
            if calls[0] == 2:
                original(*a, **kw)
                raise KeyboardInterrupt
            return original(*a, **kw)

        checkpoint.np.savez = interrupted
        try:
            train.train_and_evaluate(cfg, out)
        finally:
            checkpoint.np.savez = original
    assert not list(out.glob(".checkpoint.tmp-*"))  # removed at once, not left full-size
    (out / ".checkpoint.tmp-999999").mkdir()  # as a kill -9 leaves them
    (out / ".metrics.jsonl.abc123.tmp").write_text("partial")
    result = train.train_and_evaluate(cfg, out, resume=True)
    assert result.status == "finished"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [runs.CONFIG, runs.METRICS, runs.SUMMARY, runs.CHECKPOINT]
    )


def test_a_killed_binarize_leaves_temporaries_the_next_one_removes(
    small_tokenizer, small_corpus_dir, tmp_path
):
    from forgetting_lib.prep.binarize import binarize

    out = tmp_path / "x.bin"
    (tmp_path / "x.bin.tmp-999999").write_bytes(b"\0" * 4096)
    (tmp_path / "x.json.tmp-999999").write_text("{")
    binarize(f"files:{small_corpus_dir}/*.txt", small_tokenizer, out, dataset_id=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.json"]


def test_a_full_disk_names_the_folder_and_the_bytes_and_keeps_what_was_saved(
    tokens, tmp_path, monkeypatch, capsys
):
    import shutil

    params, out = pretrain_params(tmp_path, tokens), tmp_path / "run"
    argv = [
        "train",
        str(params),
        "--out",
        str(out),
        "log.checkpoint_every_tokens=256",
        "stop.num_tokens_train=1024",
    ]
    real = shutil.disk_usage
    saves = [0]

    def nearly_full(path):  # room for the first checkpoint, not for the second
        usage = real(path)
        return usage._replace(free=usage.free if saves[0] < 1 else 1000)

    save = checkpoint.save

    def counting_save(*a, **kw):
        save(*a, **kw)
        saves[0] += 1

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", nearly_full)
    monkeypatch.setattr(train.checkpoint, "save", counting_save)
    assert cli_main(argv) == 2
    err = one_line_error(
        capsys, f"cannot write the checkpoint {out / runs.CHECKPOINT}", "bytes are free", "it needs"
    )
    assert "1,000 bytes are free" in err
    assert checkpoint.read_meta(out / runs.CHECKPOINT)["tracker"]["step"] == 4  # the first one is intact
    assert not list(out.glob(".checkpoint.tmp-*"))
    # a write that fails half-way with ENOSPC: the temporary is removed, the error is the same
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", real)

    def enospc(f, **arrays):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.np, "savez", enospc)
    assert cli_main([*argv, "--resume"]) == 2
    one_line_error(capsys, f"cannot write the checkpoint {out / runs.CHECKPOINT}: no space left")
    assert not list(out.glob(".checkpoint.tmp-*"))
    monkeypatch.undo()
    assert cli_main([*argv, "--resume"]) == 0  # space freed: the run continues
    steps = [r["step"] for r in runs.read_metrics(out)]
    assert steps == [0, 4, 8, 12, 16]
