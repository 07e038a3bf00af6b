"""The one rule for relative paths: what a user types is relative to the current directory; what
a run folder records is relative to the run folder (with the folder's old place as a fallback).

Each test works from relative paths and changes directory, as users do: runs are opened from
another directory, whole trees are moved, a sweep folder is moved on its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from forgetting_lib import config, runs
from forgetting_lib.engine.train import train_and_evaluate
from forgetting_lib.experiments import sweep
from forgetting_lib.experiments.notebooks import project_root

from tokenfiles import write_token_file

T, B, V = 16, 4, 64
MODEL = {"D": 32, "L": 1, "H": 16, "V": V, "dtype": "float32"}
DATA = {"T": T, "batch_size": B, "valid_tokens": 8 * T, "microbatch_rows": B}
LOG = {"every_tokens": 2 * B * T, "progress": False}
PRETRAIN = {"model": MODEL, "data": DATA, "opt": {"lr": 3e-3, "warmup_tokens": 0}, "log": LOG,
            "stop": {"num_tokens_train": 4 * B * T}}  # fmt: skip
FINETUNE = {"data": DATA, "opt": {"lr": 3e-3, "warmup_tokens": 0}, "log": LOG,
            "reg": {"method": "kl_pre", "coeff": 1.0, "replay_batch_size": 2},
            "stop": {"num_tokens_train": 2 * B * T}}  # fmt: skip


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """tmp/project with data/old.bin, data/new.bin and a pretrained runs/parent, all made from
    inside the project with relative paths."""
    root = tmp_path / "project"
    monkeypatch.chdir(tmp_path)
    write_token_file(root / "data" / "old.bin", 3000, vocab_size=V, dataset_token=1, seed=0)
    write_token_file(root / "data" / "new.bin", 3000, vocab_size=V, dataset_token=2, seed=1)
    monkeypatch.chdir(root)
    cfg = config.load(PRETRAIN, [("data.path", "data/old.bin")])
    assert train_and_evaluate(cfg, "runs/parent").status == "finished"
    return root


def finetune(parent: str, data: str, out: str):
    return train_and_evaluate(config.load(FINETUNE, [("model.load_path", parent), ("data.path", data)]), out)


def test_a_run_folder_stores_its_paths_relative_to_itself(project):
    stored = yaml.safe_load((project / "runs" / "parent" / runs.CONFIG).read_text())
    assert stored["data"]["path"] == os.path.join("..", "..", "data", "old.bin")
    assert stored[config.WRITTEN_AT] == str(project / "runs" / "parent")
    assert runs.read_config("runs/parent")["data"]["path"] == os.path.join("data", "old.bin")
    # a run folder's config.yaml is itself a loadable parameter file, its paths read from it
    assert config.load(project / "runs" / "parent" / runs.CONFIG).data.path == str(
        project / "data" / "old.bin"
    )


def test_a_parent_opened_from_another_directory_finds_its_data(project, monkeypatch):
    elsewhere = project.parent / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # as a notebook kernel in notebooks/ would be
    result = finetune("../../project/runs/parent", "../../project/data/new.bin", "child")
    assert result.status == "finished" and "prev_ntp" in result.final  # the parent's data was found
    child = runs.read_config("child")
    assert child["parent"]["data_path"] == os.path.join("..", "..", "project", "data", "old.bin")
    assert child["model"]["load_path"] == os.path.join("..", "..", "project", "runs", "parent")


def test_a_moved_project_and_a_run_moved_on_its_own_stay_valid(project, monkeypatch):
    moved = project.parent / "renamed"
    shutil.move(project, moved)  # the whole tree: relative links hold
    monkeypatch.chdir(moved)
    result = finetune("runs/parent", "data/new.bin", "runs/child")
    assert "prev_ntp" in result.final
    # the parent alone, to another depth: its data is found where the folder was written from
    shutil.move(moved / "runs" / "parent", moved / "archive" / "2026" / "parent")
    shutil.move(moved, project)
    monkeypatch.chdir(project)
    runs_elsewhere = train_and_evaluate(
        config.load(FINETUNE, [("model.load_path", "archive/2026/parent"), ("data.path", "data/new.bin")]),
        "runs/child2",
    )
    assert "prev_ntp" in runs_elsewhere.final
    # a finished run resumed from another directory is recognised as the same run
    monkeypatch.chdir(project / "runs")
    overrides = [("model.load_path", "../archive/2026/parent"), ("data.path", "../data/new.bin")]
    again = train_and_evaluate(config.load(FINETUNE, overrides), "child2", resume=True)
    assert again.status == "finished" and again.step == runs_elsewhere.step


def test_a_config_written_before_relative_paths_reads_as_it_was_written(tmp_path):
    run = tmp_path / "old_run"
    run.mkdir()
    (run / runs.CONFIG).write_text(yaml.safe_dump({"data": {"path": "outputs/quickstart/data/en.bin"}}))
    assert runs.read_config(run)["data"]["path"] == "outputs/quickstart/data/en.bin"


@pytest.mark.slow
def test_a_finished_sweep_moved_elsewhere_is_still_finished(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = write_token_file(tmp_path / "data" / "old.bin", 3000, vocab_size=V, dataset_token=1, seed=0)
    new = write_token_file(tmp_path / "data" / "new.bin", 3000, vocab_size=V, dataset_token=2, seed=1)

    def spec(out: str) -> dict:
        return {
            "out": out,
            "stages": {
                "pretrain": {
                    "base": PRETRAIN,
                    "set": {"data.path": "data/old.bin"},
                    "grid": {"run.seed": [0]},
                },
                "finetune": {
                    "base": FINETUNE,
                    "after": "pretrain",
                    "set": {"data.path": "data/new.bin"},
                    "grid": {"opt.lr": [1e-3]},
                },
            },
        }

    first = sweep.run_sweep(spec("sweeps/a"), notebook=False, log=lambda _: None)
    assert list(first["status"]) == ["finished", "finished"]
    shutil.move("sweeps/a", "archive/2026/b")  # another depth: the data links need the fallback
    moved = spec("archive/2026/b")
    assert sweep.stage_status(moved, "finetune") == {"finished": 1, "points": 1}
    again = sweep.run_sweep(moved, notebook=False, log=lambda _: None)
    assert list(again["status"]) == ["done", "done"]
    frame = sweep.load_stage(moved, "finetune")
    assert len(frame) and frame["forgetting"].notna().all()
    assert old.exists() and new.exists()


def test_a_kernel_started_inside_notebooks_works_in_the_project_root(tmp_path):
    (tmp_path / "proj" / "notebooks" / "figures").mkdir(parents=True)
    assert project_root(tmp_path / "proj" / "notebooks") == (tmp_path / "proj").resolve()
    assert project_root(tmp_path / "proj" / "notebooks" / "figures") == (tmp_path / "proj").resolve()
    assert project_root(tmp_path / "proj") is None


def test_hf_load_paths_are_stored_relative_when_local_and_as_given_when_hub_ids(tmp_path, monkeypatch):
    """`hf:<folder>` follows the path rule (relative to the run folder once stored); `hf:<owner/name>`,
    a hub id, is not a path and is kept as typed."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    raw = {"model": {"load_path": "hf:models/tiny"}, "data": {"path": "data/new.bin"}}
    stored = config.paths_relative_to(raw, "runs/child")
    assert stored["model"]["load_path"] == "hf:" + os.path.join("..", "..", "models", "tiny")
    monkeypatch.chdir(tmp_path / "models")  # opened from elsewhere: back to a path from here
    back = config.paths_resolved_from(stored, os.path.join("..", "runs", "child"))
    assert back["model"]["load_path"] == "hf:" + os.path.join("..", "models", "tiny")
    assert os.path.isdir(back["model"]["load_path"].removeprefix("hf:"))
    # a resumed run compares its stored load_path with the given one (runs.same_path)
    assert runs.same_path(back["model"]["load_path"], "hf:" + str(tmp_path / "models" / "tiny"))
    assert runs.same_path("hf:owner/name", "hf:owner/name") and not runs.same_path("hf:owner/a", "hf:owner/b")
    assert not runs.same_path("hf:tiny", "tiny")
    hub = {"model": {"load_path": "hf:meta-llama/Llama-3.2-1B"}}
    assert config.paths_relative_to(hub, "runs/child")["model"]["load_path"] == "hf:meta-llama/Llama-3.2-1B"
    assert config.paths_resolved_from({**hub, config.WRITTEN_AT: str(tmp_path)}, "x")["model"] == hub["model"]
