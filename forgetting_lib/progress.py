"""Progress reporting: a tqdm bar in an interactive terminal or notebook, plain lines otherwise.

Papermill and CI logs are not TTYs; a redrawn bar there becomes thousands of lines, so they get
one plain line every `every_seconds` instead.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def is_interactive() -> bool:
    """True in a terminal or a live Jupyter kernel; False in a pipe, CI, or when the caller set
    FORGETTING_PLAIN_PROGRESS=1 (our papermill launchers do: a papermill kernel looks like a live
    one, but nobody watches a redrawn bar in an executed notebook)."""
    if os.environ.get("FORGETTING_PLAIN_PROGRESS", "") == "1":
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell":
            return True
    except ImportError:
        pass
    return sys.stderr.isatty()


class Progress:
    """Counts units of work (tokens, documents) towards an optional total.

    Use as a context manager; call `update(n, **postfix)` as work is done.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        every_seconds: float = 10.0,
        interactive: bool | None = None,
        enabled: bool = True,
    ):
        self.desc, self.total, self.unit = desc, total, unit
        self.every_seconds = every_seconds
        self.count = 0
        self.enabled = enabled
        self._interactive = is_interactive() if interactive is None else interactive
        self._bar = None
        self._start = self._last = time.perf_counter()
        self._postfix: dict[str, Any] = {}

    def __enter__(self) -> "Progress":
        if self._interactive and self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, unit_scale=True)
        return self

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        self._postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_seconds:
            self._last = now
            print(self._line(now), flush=True)

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = f"{self.count:,}" + (f"/{self.total:,}" if self.total else "")
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self._postfix.items())
        return f"{self.desc}: {done} {self.unit} ({rate:,.0f} {self.unit}/s, {elapsed:.0f}s) {extra}".rstrip()

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(self._line(time.perf_counter()), flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
