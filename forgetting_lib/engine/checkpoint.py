"""Checkpoints: a pytree of arrays plus JSON metadata, written atomically as one folder.

Layout: `<dir>/arrays.npz` (one entry per leaf, keyed by its pytree path) and `<dir>/meta.json`
(written last; holds step, data position, RNG seed, timings). A new checkpoint is written to a
temporary folder and swapped in by rename, so a run killed at any moment leaves either the previous
complete checkpoint or the new complete one, never a half-written folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..fileio import atomic_write_json, is_no_space, no_space_message

META = "meta.json"
ARRAYS = "arrays.npz"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the model; the message says the fix."""


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def save(directory: str | Path, tree: Any, meta: dict[str, Any]) -> None:
    """Write `tree` and `meta` to `directory`, replacing any previous checkpoint atomically. On a
    full disk (checked before writing, and caught while writing) the temporary folder is removed
    and a CheckpointError names the folder and the bytes needed; the previous checkpoint stays."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    arrays = _flatten(jax.device_get(tree))
    needed = sum(a.nbytes for a in arrays.values()) + 4096 * (len(arrays) + 2)  # + npz headers, meta
    full = f"cannot write the checkpoint {directory}"
    directory.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(directory.parent).free < needed:
        raise CheckpointError(f"{full}: {no_space_message(directory.parent, needed)}")
    try:
        tmp.mkdir(parents=True)
        with open(tmp / ARRAYS, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        atomic_write_json(tmp / META, {**meta, "num_arrays": len(arrays)})
    except BaseException as err:  # full disk, Ctrl-C: no full-size leftover
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(err):
            raise CheckpointError(f"{full}: {no_space_message(directory.parent, needed)}") from None
        raise
    if directory.exists():  # `directory` is complete, so an older `.old` is stale
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)  # only now is any `.old` (a cut swap's survivor) redundant
    shutil.rmtree(old, ignore_errors=True)


def latest(directory: str | Path) -> Path | None:
    """The complete checkpoint folder to load: `directory`, or the previous one if a swap was cut."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(f".{directory.name}.old")):
        if (candidate / META).is_file() and (candidate / ARRAYS).is_file():
            return candidate
    return None


def read_meta(directory: str | Path) -> dict[str, Any]:
    found = latest(directory)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {directory} (meta.json and arrays.npz)")
    return _read_meta(found)


def _read_meta(found: Path) -> dict[str, Any]:
    try:
        meta = json.loads((found / META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return meta
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{found / META} is damaged ({err}): the checkpoint cannot be used; restore the run "
            f"folder from a backup, or start the run again (--overwrite)"
        ) from None


def load(directory: str | Path, template: Any) -> tuple[Any, dict[str, Any]]:
    """Restore a pytree shaped like `template` (arrays or ShapeDtypeStructs) and the metadata."""
    found = latest(directory)
    if found is None:
        raise CheckpointError(
            f"no complete checkpoint in {directory}; the run never reached its "
            f"first checkpoint: start it again without resuming"
        )
    meta = _read_meta(found)
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    try:
        with np.load(found / ARRAYS) as stored:
            arrays = {k: stored[k] for k in (jax.tree_util.keystr(p) for p, _ in paths) if k in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{found / ARRAYS} is unreadable ({err}); delete the run folder and rerun"
        ) from err
    leaves = []
    for path, like in paths:
        key = jax.tree_util.keystr(path)
        if key not in arrays:
            raise CheckpointError(
                f"{found}: has no array {key}; it was written for another model or optimizer configuration"
            )
        value = arrays[key]
        if value.dtype.kind == "V" and value.dtype.itemsize == np.dtype(like.dtype).itemsize:
            value = value.view(like.dtype)  # .npz keeps bfloat16 (an extension dtype) as raw bytes
        if value.shape != tuple(like.shape) or value.dtype != like.dtype:
            raise CheckpointError(
                f"{found}: {key} is {value.dtype}{list(value.shape)} but the "
                f"model expects {like.dtype}{list(like.shape)}; check model.*"
            )
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves), meta
