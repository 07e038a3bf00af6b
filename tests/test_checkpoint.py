"""Checkpoints: round trip, atomic replacement (a crash at any point of `save` leaves a complete
old or new checkpoint), leftovers of killed writers ignored, clear errors on mismatches."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from forgetting_lib.engine import checkpoint
from forgetting_lib.engine.checkpoint import CheckpointError


def make_tree(version: int) -> dict:
    return {
        "params": {"w": np.full((3, 4), version, np.float32), "b": np.arange(5, dtype=np.int32) + version},
        "opt": [np.float32(version), {"mu": np.ones((2,), np.float32) * version}],
        "count": np.int32(version),
    }


def assert_tree_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


def version_of(directory) -> int:
    tree, meta = checkpoint.load(directory, make_tree(0))
    assert meta["version"] == int(tree["count"])  # arrays and meta come from the same save
    return meta["version"]


def test_round_trip(tmp_path):
    tree = make_tree(7)
    tree["jax"] = jnp.linspace(0, 1, 6, dtype=jnp.float32).reshape(2, 3)
    checkpoint.save(tmp_path / "ckpt", tree, {"step": 12, "nested": {"a": [1, 2]}})
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
    loaded, meta = checkpoint.load(tmp_path / "ckpt", template)
    assert_tree_equal(loaded, jax.device_get(tree))
    assert meta["step"] == 12 and meta["nested"] == {"a": [1, 2]}
    assert meta["num_arrays"] == len(jax.tree_util.tree_leaves(tree))
    assert checkpoint.read_meta(tmp_path / "ckpt")["step"] == 12
    # saving again replaces it and leaves no temporary or old folders behind
    checkpoint.save(tmp_path / "ckpt", make_tree(8), {"version": 8})
    assert version_of(tmp_path / "ckpt") == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    assert checkpoint.latest(tmp_path / "none") is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.load(tmp_path / "none", make_tree(0))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "arrays.npz").write_bytes(b"")  # no meta.json: not complete
    assert checkpoint.latest(tmp_path / "half") is None
    with pytest.raises(CheckpointError):
        checkpoint.read_meta(tmp_path / "half")


def test_leftover_temporary_folder_is_ignored(tmp_path):
    d = tmp_path / "checkpoint"
    checkpoint.save(d, make_tree(1), {"version": 1})
    torn = tmp_path / ".checkpoint.tmp-999999"  # a writer killed mid-save (another pid)
    torn.mkdir()
    (torn / "arrays.npz").write_bytes(b"PK\x03\x04 torn")
    (torn / "meta.json").write_text(json.dumps({"version": 2, "step": 10**6}))
    assert checkpoint.latest(d) == d and version_of(d) == 1
    checkpoint.save(d, make_tree(3), {"version": 3})  # a later save is not confused by it
    assert version_of(d) == 3
    assert checkpoint.latest(tmp_path / "nothing_here") is None


def test_cut_swap_leaves_the_old_folder_which_latest_finds(tmp_path):
    d = tmp_path / "checkpoint"
    checkpoint.save(d, make_tree(1), {"version": 1})
    os.replace(d, tmp_path / ".checkpoint.old")  # killed between the two renames of the swap
    assert checkpoint.latest(d) == tmp_path / ".checkpoint.old"
    assert version_of(d) == 1 and checkpoint.read_meta(d)["version"] == 1
    checkpoint.save(d, make_tree(2), {"version": 2})
    assert checkpoint.latest(d) == d and version_of(d) == 2
    assert not (tmp_path / ".checkpoint.old").exists()


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


class Proxy:
    """A module with some functions replaced."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._module, name)


def save_crashing_at(monkeypatch, k: int, directory, tree, meta) -> bool:
    """Run checkpoint.save, "killed" just before its k-th file-system step; True if it crashed."""
    calls = [0]

    def hook(fn):
        def wrapper(*args, **kwargs):
            if calls[0] == k:
                raise Crash
            calls[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "os", Proxy(os, replace=hook(os.replace)))
        m.setattr(checkpoint, "shutil", Proxy(shutil, rmtree=hook(shutil.rmtree)))
        m.setattr(checkpoint, "np", Proxy(np, savez=hook(np.savez)))
        m.setattr(checkpoint, "atomic_write_json", hook(checkpoint.atomic_write_json))
        try:
            checkpoint.save(directory, tree, meta)
        except Crash:
            return True
    return False


def crash_everywhere(monkeypatch, tmp_path, start_state):
    """For each crash point of save(v2) over a v1 checkpoint in `start_state`: the checkpoint
    that `latest` finds is complete and is v1 or v2 (v2 once save returned), and a later save works."""
    k = 0
    while True:
        root = tmp_path / f"crash{k}"
        d = root / "checkpoint"
        checkpoint.save(d, make_tree(1), {"version": 1})
        if start_state == "old_only":
            os.replace(d, root / ".checkpoint.old")
        crashed = save_crashing_at(monkeypatch, k, d, make_tree(2), {"version": 2})
        assert checkpoint.latest(d) is not None, (
            f"crash before step {k} of save left no complete checkpoint: "
            f"{sorted(p.name for p in root.iterdir())}"
        )
        assert version_of(d) in ((1, 2) if crashed else (2,))
        checkpoint.save(d, make_tree(3), {"version": 3})  # the run goes on after a resume
        assert version_of(d) == 3
        if not crashed:
            return k
        k += 1


def test_a_crash_at_any_point_of_save_leaves_a_complete_checkpoint(monkeypatch, tmp_path):
    steps = crash_everywhere(monkeypatch, tmp_path, "normal")
    assert steps >= 6  # rmtree tmp, savez, meta, rmtree old, 2 renames, rmtree old
