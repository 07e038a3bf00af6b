"""Atomic file writes, strict readers of the YAML files users write, and removal of the
temporaries a killed writer leaves.

Atomic writes go to a temporary file beside the target (`.<name>.<random>.tmp`), are fsynced,
then renamed over it: a reader sees either the old complete file or the new complete file,
never a partial one, even if the writer is killed mid-way.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml


class FileFormatError(ValueError):
    """A file a user wrote cannot be read (not UTF-8, not valid YAML, a refused YAML tag); the
    message names the file, the line and column, and the fix."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_yaml(path: str | Path) -> Any:
    """The plain YAML in `path` (numbers, strings, lists, mappings); errors name file:line:col."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as err:
        raise FileFormatError(
            f"{path}: byte {err.start} is not UTF-8 ({err.reason}); save the file as UTF-8"
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = err.problem or err.context or "not valid YAML"
        if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
            raise FileFormatError(
                f"{where}: {problem}; these files hold plain values (numbers, strings, lists, "
                f"mappings): remove the tag (Python tags are refused, loading them could run code)"
            ) from None
        raise FileFormatError(f"{where}: not valid YAML: {problem}; fix that line") from None
    except yaml.YAMLError as err:
        raise FileFormatError(f"{path}: not valid YAML ({err})") from None


def no_space_message(folder: str | Path, needed: int | None = None) -> str:
    """The one line a full disk is reported with: the folder, the bytes needed and free."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    need = f"it needs {needed:,} bytes, " if needed is not None else ""
    return (
        f"no space left on the device of {folder}: {need}{free:,} bytes are free; free some space "
        f"and rerun (everything already saved is kept)"
    )


def is_no_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def remove_temporaries(folder: str | Path, patterns: Iterable[str]) -> list[Path]:
    """Delete files and folders in `folder` matching the glob `patterns` (leftovers of killed
    writers; call it holding the lock that excludes live ones); returns what was removed."""
    removed = []
    for pattern in patterns:
        for name in glob.glob(glob.escape(str(folder)) + os.sep + pattern):
            path = Path(name)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
