"""Optional mirrors of a run's metrics.jsonl: Weights & Biases (`log.wandb`) and TensorBoard
(`log.tensorboard`), both off by default. metrics.jsonl stays the record; a sink gets each row
as it is appended (its numeric values, at its `step`) and summary.json at the end.

W&B writes into `<run>/wandb/` (offline unless credentials are set up: `log.wandb_mode`); its run
id is kept in `<run>/wandb/run_id`, so a resumed run continues the same W&B run and a restarted
one (from step 0, or `--overwrite`) starts a new one. TensorBoard event files go to
`<run>/tensorboard/`, written without TensorFlow and flushed after every row; each session starts
with a restart marker at its first new step, from which TensorBoard drops an earlier session's
points. A sink that fails mid-run is dropped with a warning: training goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import netrc
import numbers
import os
import secrets
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config

INSTALL = "pip install 'forgetting_lib[trackers]'"
_FILE_NUMBERS = itertools.count()  # event files of one process opened within the same second


def open_trackers(cfg: Config, out_dir: Path, *, resumed_step: int) -> Trackers:
    """The sinks `cfg.log` enables for the run folder `out_dir`; `resumed_step` is the step the
    run continues from (0 for a fresh run, whose step-0 row is new)."""
    out_dir, sinks = Path(out_dir), []
    try:
        if cfg.log.tensorboard:
            sinks.append(_TensorBoard(out_dir / "tensorboard", resumed_step))
        if cfg.log.wandb:
            sinks.append(_WandB(cfg, out_dir, resumed_step))
    except BaseException:
        Trackers(sinks, resumed_step).close(failed=True)
        raise
    return Trackers(sinks, resumed_step)


class Trackers:
    """Mirrors metrics rows to the enabled sinks; a context manager that closes them."""

    def __init__(self, sinks: list[Any], resumed_step: int):
        self._sinks = sinks
        self._last_step = resumed_step if resumed_step > 0 else -1  # rows up to it are logged

    def log(self, row: dict[str, Any]) -> None:
        """One metrics row: its numeric values (None and others skipped) at step row["step"]."""
        step = int(row["step"])
        if step <= self._last_step:
            return  # a resumed run's rows up to its checkpoint were logged by the earlier session
        self._last_step = step
        scalars = {k: float(v) for k, v in row.items() if k != "step" and _is_number(v)}
        self._each("log", step, scalars)

    def finish(self, summary: dict[str, Any]) -> None:
        """Record the run's summary.json and close the sinks."""
        self._each("finish", summary)
        self._sinks = []

    def close(self, failed: bool = False) -> None:
        """Close the sinks (W&B marks a failed run as crashed), never raising."""
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                sink.close(failed)
        self._sinks = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.close(failed=kind is not None)

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self._sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as err:  # a mirror failing must not stop the run
                message = f"{sink.key}: {err!r}; it stops here (metrics.jsonl keeps every row)"
                warnings.warn(message, stacklevel=3)
                self._sinks.remove(sink)
                with contextlib.suppress(Exception):
                    sink.close(True)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _missing(module: str, key: str) -> ImportError:
    return ImportError(f"{key}=true needs the {module} package: {INSTALL} (or set {key}=false)")


class _TensorBoard:
    key = "log.tensorboard"

    def __init__(self, folder: Path, resumed_step: int):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError as err:
            raise _missing("tensorboard", self.key) from err
        self._event, self._summary = event_pb2, summary_pb2
        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self._file = RecordWriter(open(folder / f"{name}.{next(_FILE_NUMBERS)}", "xb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        first = resumed_step + 1 if resumed_step > 0 else 0
        self._write(event_pb2.Event(wall_time=time.time(), step=first, session_log=restart))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        values = [self._summary.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        summary = self._summary.Summary(value=values)
        self._write(self._event.Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: Any) -> None:
        self._file.write(event.SerializeToString())
        self._file.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        self._file.close()

    def close(self, failed: bool) -> None:
        self._file.close()


class _WandB:
    key = "log.wandb"

    def __init__(self, cfg: Config, out_dir: Path, resumed_step: int):
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", self.key) from err
        folder = out_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        if resumed_step == 0 or not id_file.is_file():  # a new W&B run per start from scratch
            id_file.write_text(secrets.token_hex(8) + "\n")
        self.run = wandb.init(
            project=cfg.log.wandb_project,
            group=cfg.run.experiment,
            name=out_dir.resolve().name,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=out_dir,
            config=cfg.to_dict(),
            mode=wandb_mode(cfg.log.wandb_mode),
            reinit="create_new",  # runs side by side in one process (threads, notebooks)
            settings=wandb.Settings(console="off"),  # the run's output stays as it is
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step >= self.run.starting_step:  # online, a resumed run starts after its last step
            self.run.log(scalars, step=step, commit=True)  # committed now: summary.json wins

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(summary)
        self.close(failed=summary.get("status") == "failed")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def wandb_mode(setting: str) -> str:
    """W&B's mode for `log.wandb_mode`: auto is WANDB_MODE where set, else online where W&B
    credentials are (WANDB_API_KEY, or a .netrc entry for the W&B host), else offline."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        found = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        found = None
    return "online" if found and found[2] else "offline"
