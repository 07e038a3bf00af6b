"""Process-wide runtime settings that make JAX runs fast and notebook-friendly.

Call `configure()` once at an entry point (the training loop and the CLI do); it is idempotent.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Iterator

_done = False
# The platform the engine's automatic settings are chosen for, where it is not the one this
# process runs on (an ahead-of-time check on a CPU for an accelerator: engine/aot.py).
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("forgetting_target", default=None)


def configure(cache_dir: str | Path | None = None) -> None:
    """Keep freed host memory in-process, and enable JAX's persistent compilation cache."""
    global _done
    if _done:
        return
    _done = True
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # effective before jax import
    keep_host_allocations()
    import jax

    cache = Path(
        cache_dir or os.environ.get("FORGETTING_JAX_CACHE", Path.home() / ".cache" / "forgetting_lib" / "jax")
    )
    jax.config.update("jax_compilation_cache_dir", str(cache))
    # every program, however quick to compile: a run's ~30 small ones (parameter init, the
    # parent's copy, metrics) cost ~0.25 s more with a 0.1 s threshold (benchmarks/cold_start.py)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def keep_host_allocations() -> bool:
    """Stop glibc from returning large freed blocks to the kernel (mallopt M_MMAP_MAX=0,
    M_TRIM_THRESHOLD=max).

    XLA's CPU backend allocates each step's large temporaries afresh; by default glibc serves them
    with mmap and unmaps them on free, so every step pays page faults on tens of MB. Keeping them
    in the heap cut the evaluation time of the tutorial model by ~30%
    (benchmarks/train_throughput.py). Returns False where this is not glibc (no-op).
    """
    name = ctypes.util.find_library("c")
    if not name or os.environ.get("FORGETTING_KEEP_MALLOC_DEFAULTS") == "1":
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def platform() -> str:
    """The platform ("cpu", "gpu", "tpu") the engine's automatic settings are chosen for: the
    activation dtype, microbatches, loss chunks, evaluation and sampling batch sizes. JAX's default
    backend, unless `targeting` names another one."""
    target = _TARGET.get()
    if target is not None:
        return target
    import jax

    return jax.default_backend()


@contextlib.contextmanager
def targeting(name: str) -> Iterator[None]:
    """Within this block (in this thread), `platform()` is `name`: programs traced here are built as
    they would be on that platform (compiled for this one)."""
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)
