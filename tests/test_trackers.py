"""Trackers (trackers.py): off by default and then inert; TensorBoard event files and offline W&B
runs hold exactly the metrics rows (read back with each library's own reader); a resumed run
logs no step twice; bad settings and a missing package are clear errors."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from forgetting_lib import config, trackers
from forgetting_lib.config import ConfigError

ROWS = [
    {"step": s, "tokens": 4096 * s, "valid_ntp": 8.0 - s / 10, "train_ntp": None if s == 0 else 7.5 - s / 10}
    | {"epoch": s / 100, "tokens_per_s": None if s == 0 else 1234.5, "note": "text"}
    for s in (0, 10, 20, 30)
]


def _cfg(**log):
    return config.load({"stop": {"num_tokens_train": 1}, "log": log})


def _numbers(row):
    return {k: v for k, v in row.items() if k not in ("step", "note") and v is not None}


def test_off_by_default_does_nothing_and_imports_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing either would now raise
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = _cfg()
    assert not cfg.log.wandb and not cfg.log.tensorboard
    with trackers.open_trackers(cfg, tmp_path / "run", resumed_step=0) as sinks:
        for row in ROWS:
            sinks.log(row)
        sinks.finish({"status": "finished"})
    assert not (tmp_path / "run").exists()


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    for module, key in (("wandb", "wandb"), ("tensorboard.compat.proto", "tensorboard")):
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(ImportError, match=rf"log\.{key}=true.*pip install 'forgetting_lib\[trackers\]'"):
            trackers.open_trackers(_cfg(**{key: True}), tmp_path, resumed_step=0)


@pytest.mark.parametrize(
    "key, value, message",
    [("wandb_mode", "cloud", "must be auto, online or offline"), ("wandb_project", "a/b", "without /")],
)
def test_bad_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=rf"log\.{key}.*{message}"):
        config.load({"stop": {"num_tokens_train": 1}}, [(f"log.{key}", value)])


def _scalars(folder):
    """{tag: [(step, value)]} as TensorBoard reads the folder (restarts purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expected(rows):
    out = {}
    for row in rows:
        for k, v in _numbers(row).items():
            out.setdefault(k, []).append((row["step"], pytest.approx(v, rel=1e-6)))  # float32
    return out


def test_tensorboard_holds_every_row_flushed_as_logged(tmp_path):
    sinks = trackers.open_trackers(_cfg(tensorboard=True), tmp_path, resumed_step=0)
    for row in ROWS[:2]:
        sinks.log(row)
    assert _scalars(tmp_path / "tensorboard") == _expected(ROWS[:2])  # readable before closing
    for row in ROWS[2:]:
        sinks.log(row)
    sinks.finish({"status": "finished"})
    assert _scalars(tmp_path / "tensorboard") == _expected(ROWS)


def test_tensorboard_resume_logs_no_step_twice(tmp_path):
    cfg = _cfg(tensorboard=True)
    with trackers.open_trackers(cfg, tmp_path, resumed_step=0) as sinks:  # killed after step 30,
        for row in ROWS:  # checkpointed at step 10
            sinks.log(row)
    again = [dict(row, valid_ntp=row["valid_ntp"] + 1) for row in ROWS]  # same steps, new values
    with trackers.open_trackers(cfg, tmp_path, resumed_step=10) as sinks:
        for row in again:
            sinks.log(row)  # the rows up to step 10 are skipped
        sinks.finish({"status": "finished"})
    assert _scalars(tmp_path / "tensorboard") == _expected(ROWS[:2] + again[2:])


def test_a_failing_sink_is_dropped_with_a_warning(tmp_path):
    sinks = trackers.open_trackers(_cfg(tensorboard=True), tmp_path, resumed_step=0)
    sinks.log(ROWS[0])
    sinks._sinks[0]._file.close()  # the disk went away
    with pytest.warns(UserWarning, match="log.tensorboard: .*metrics.jsonl keeps every row"):
        sinks.log(ROWS[1])
    sinks.log(ROWS[2])
    sinks.finish({"status": "finished"})


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, with nothing written or read outside tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield tmp_path / "run"
    import wandb

    wandb.teardown()  # stop this process's wandb-core service (it would outlive the test's HOME)


def _wandb_records(run_dir):
    """Per session (offline run folder, in order): its W&B records, read from the .wandb file
    (a LevelDB-style log: 7-byte header, then 32 KiB blocks of crc32, length, kind, data)."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # run.finish() returns before wandb-core has written the file; this waits
    sessions = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, chunk, records = path.read_bytes(), 7, b"", []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's zero-padded tail
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                records.append(wandb_internal_pb2.Record.FromString(chunk))
                chunk = b""
        sessions.append(records)
    return sessions


def _history(records):
    rows = [
        {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return [{k: v for k, v in row.items() if not k.startswith("_") or k == "_step"} for row in rows]


def _logged(rows):
    return [{"_step": row["step"], **_numbers(row)} for row in rows]


def test_wandb_offline_run_holds_the_rows_summary_and_config(offline):
    cfg = _cfg(wandb=True)
    with trackers.open_trackers(cfg, offline, resumed_step=0) as sinks:
        for row in ROWS:
            sinks.log(row)
        sinks.finish({"status": "finished", "final": _numbers(ROWS[-1]), "tokens_per_s": 99.0})
    [records] = _wandb_records(offline)
    assert _history(records) == _logged(ROWS)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, run.run_group) == ("forgetting", "run", "default")
    assert run.run_id == (offline / "wandb" / "run_id").read_text().strip()
    stored = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert stored["log"]["wandb"] is True and stored["opt"]["lr"] == cfg.opt.lr
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or i.nested_key[0]: json.loads(i.value_json) for i in r.summary.update})
    assert summary["status"] == "finished" and summary["tokens_per_s"] == 99.0  # summary.json wins
    assert summary["final"] == _numbers(ROWS[-1])
    exit_code = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_code == [0]
    assert {p.name for p in offline.iterdir()} == {"wandb"}  # nothing outside the run's wandb/


def test_wandb_resume_continues_the_run_without_repeating_steps(offline):
    cfg = _cfg(wandb=True)
    with pytest.raises(RuntimeError), trackers.open_trackers(cfg, offline, resumed_step=0) as sinks:
        for row in ROWS[:3]:
            sinks.log(row)
        raise RuntimeError("killed after step 20, checkpointed at step 10")
    with trackers.open_trackers(cfg, offline, resumed_step=10) as sinks:
        for row in ROWS:
            sinks.log(row)
        sinks.finish({"status": "finished"})
    first, second = _wandb_records(offline)
    ids = {r.run.run_id for r in first + second if r.WhichOneof("record_type") == "run"}
    assert len(ids) == 1
    assert _history(first) == _logged(ROWS[:3]) and _history(second) == _logged(ROWS[2:])
    assert [r.exit.exit_code for r in first + second if r.WhichOneof("record_type") == "exit"] == [1, 0]


def test_wandb_mode_auto_is_offline_without_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert trackers.wandb_mode("auto") == "offline"
    assert trackers.wandb_mode("online") == "online"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    assert trackers.wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert trackers.wandb_mode("auto") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "abc123")
    assert trackers.wandb_mode("auto") == "online"


def test_a_real_run_mirrors_its_metrics_to_both_trackers(offline, tmp_path):
    """train_and_evaluate with log.tensorboard and log.wandb: each sink holds metrics.jsonl."""
    from forgetting_lib import runs
    from forgetting_lib.engine.train import train_and_evaluate

    from tokenfiles import write_token_file

    data = write_token_file(tmp_path / "tokens.bin", 64 * 16, vocab_size=32, seed=0)
    cfg = config.from_dict(
        {
            "data": {"path": str(data), "T": 16, "batch_size": 4, "valid_tokens": 8 * 16},
            "model": {"D": 16, "L": 1, "H": 8, "V": 32, "dtype": "float32"},
            "stop": {"num_tokens_train": 12 * 64},
            "log": {"every_tokens": 4 * 64, "progress": False, "tensorboard": True, "wandb": True},
        }
    )
    result = train_and_evaluate(cfg, offline)
    rows = runs.read_metrics(offline)
    assert result.status == "finished" and [r["step"] for r in rows] == [0, 4, 8, 12]
    assert _scalars(offline / "tensorboard") == _expected(rows)
    [records] = _wandb_records(offline)
    assert _history(records) == _logged(rows)
