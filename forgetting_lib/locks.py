"""One writer at a time: advisory locks on run folders, sweep outputs and token files.

`hold(lock_file, what)` takes an exclusive `flock` on `lock_file` (created if missing) for the
duration of a `with` block and writes the holder's record into it (pid, host, start time,
command). A second writer gets a `LockedError` naming the holder. The kernel releases a `flock`
when its holder exits, however it exits (`kill -9` included), so a crashed writer never leaves a
lock behind on a local filesystem. Where `flock` is unavailable (some network filesystems) the
record alone is the lock, and a record left by a process of this host that no longer exists is
stale and taken over; a record from another host is trusted (the error says how to clear it).

A lock file exists only while it is held: the holder removes it on release, and a process that
opened the file just before that notices (the path names another file, or none) and starts over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: the record alone is the lock
    fcntl = None  # type: ignore[assignment]


class LockedError(RuntimeError):
    """Another process is writing there; the message names it and what to do."""


def _record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300],
    }


def read_holder(lock_file: str | Path) -> dict[str, Any] | None:
    """The record in `lock_file` (None if empty, missing or unreadable)."""
    try:
        text = Path(lock_file).read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
        f"(`{holder.get('command', '?')}`)"
    )


def _alive(holder: dict[str, Any]) -> bool:
    """False only for a holder of this host whose process is gone."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def _flock(fd: int) -> bool:
    """Take the flock without waiting: True if taken, False if another holds it; raises OSError
    where the filesystem does not support locking."""
    if fcntl is None:
        raise OSError(errno.ENOLCK, "no fcntl")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def hold(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold the lock `lock_file` for the block; `what` names the guarded thing in the error
    ("run folder outputs/x"). Raises LockedError if another process (or another `hold` in this
    one) holds it. The file is removed on release."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_file, what)
    try:
        os.pwrite(fd, (json.dumps(_record()) + "\n").encode(), 0)
        yield
    finally:
        # unlink while still holding it: a process that opened this file meanwhile sees, once it
        # gets the lock, that the path no longer names it, and starts over (see _acquire)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_file)
        os.close(fd)


def _acquire(lock_file: Path, what: str) -> int:
    """An open descriptor of `lock_file` holding its lock (see `hold`)."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                taken, record_only = _flock(fd), False
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                holder, record_only = read_holder(lock_file), True
                taken = holder is None or not _alive(holder)
            if not taken:
                holder = read_holder(lock_file)
                hint = (
                    f"; if that process is gone, delete {lock_file}"
                    if record_only or (holder and holder.get("host") != socket.gethostname())
                    else ""
                )
                raise LockedError(
                    f"{what} is in use by {describe(holder)}: wait for it to finish or stop it, "
                    f"then rerun{hint}"
                )
            try:
                same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder released (and removed) this file meanwhile: take the new one


def is_held(lock_file: str | Path) -> bool:
    """True if some process holds `lock_file` now. Read from the holder's record (the file exists
    only while held; a holder of this host killed before removing it is gone), so probing never
    blocks a writer; a record from another host is checked by briefly taking the lock."""
    holder = read_holder(lock_file)
    if holder is None:
        return False
    if holder.get("host") == socket.gethostname():
        return _alive(holder)
    try:
        with hold(lock_file, str(lock_file)):
            return False
    except LockedError:
        return True


def wait_until_free(
    lock_file: str | Path, what: str, *, poll_s: float = 2.0, log: Callable[[str], None] | None = None
) -> None:
    """Block while another process holds `lock_file` (e.g. a sweep point another sweep trains)."""
    announced = False
    while is_held(lock_file):
        if log is not None and not announced:
            log(f"{what} is in use by {describe(read_holder(lock_file))}; waiting for it")
            announced = True
        time.sleep(poll_s)
