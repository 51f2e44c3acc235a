"""How every entry point runs: bad input as one line and exit status 2, SIGTERM like Ctrl-C, no run left RUNNING."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import psutil

from lora_efficiency.errors import TrackingError, UserError, cause_line, printable
from lora_efficiency.redaction import redact


def _fail_active_run(message: str) -> None:
    """Mark the run FAILED (the one `mlflow run` opened, or ours) so nothing is left RUNNING."""
    if "mlflow" not in sys.modules and not os.environ.get("MLFLOW_RUN_ID"):
        return  # no run can be open: bad input exits without importing MLflow (2 s of a 5 s `train --rank -1`)
    import mlflow  # lazy: every entry point imports this module before parsing; MLflow's import takes ~1 s

    run = mlflow.active_run()
    run_id = run.info.run_id if run else os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "error", redact(message)[:5000])
        if run:
            mlflow.end_run("FAILED")
        else:
            client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # the store itself may be what failed; the exit status still says so
        print(f"warning: could not mark run {run_id} FAILED: {terminal_line(_one_line(exc))}", file=sys.stderr)


_TERMINATED: list[int] = []  # the signal that asked this process to stop, once one has
_DEFERRING = [0]  # > 0: inside no_interrupts()


def _interrupt(signum, frame):
    _TERMINATED.append(signum)
    if not _DEFERRING[0]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def no_interrupts():
    """A SIGTERM inside this block is held until raise_if_terminated(). Raised in the middle of MLflow's async
    logging (a lock held, a queue half-written), a KeyboardInterrupt left a 100,000-step run in CI neither
    training nor exiting after SIGTERM (twice in three runs: the test sends it right after the step-1 line, when
    step 1's metrics are being queued)."""
    _DEFERRING[0] += 1
    try:
        yield
    finally:
        _DEFERRING[0] -= 1


def raise_if_terminated() -> None:
    """Raise the KeyboardInterrupt of a SIGTERM that was held (no_interrupts) or dropped (a signal that lands in
    a finalizer is printed as "Exception ignored" and lost). The training loop calls this at every step."""
    if _TERMINATED:
        raise KeyboardInterrupt


def log_file() -> Path:
    """Where tracebacks go instead of the terminal: $LORA_EFFICIENCY_LOG (a file), else one file per process under
    the project's cache (the same folder models.cache_dir() uses)."""
    if os.environ.get("LORA_EFFICIENCY_LOG"):
        return Path(os.environ["LORA_EFFICIENCY_LOG"])
    cache = Path(os.environ.get("LORA_EFFICIENCY_CACHE", Path.home() / ".cache" / "lora-efficiency"))
    return cache / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


_LOG: list[Path] = []  # this process's log file, once something was written to it


def write_log(text: str) -> Path | None:
    """Append `text` (redacted) to this process's log file; None when even that cannot be written."""
    path = log_file() if os.environ.get("LORA_EFFICIENCY_LOG") or not _LOG else _LOG[0]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(redact(text) + "\n")
    except (OSError, ValueError):
        return None
    _LOG[:1] = [path]
    return path


class _TracebacksToLog(logging.Filter):
    """Every log record is redacted (MLflow prints its tracking URI, password included, in "View run at ..."); one
    that carries a traceback (MLflow's async logging thread prints one per failed batch: 669 lines when the store
    went read-only mid-run) goes whole to the log file, and the terminal keeps its first line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info or "\n" in message:
            write_log(logging.Formatter().format(record))
            message = (message.splitlines() or [""])[0]
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.msg, record.args = printable(redact(message)), ()  # a run name may hold ESC or a newline
        return True


def quiet_log_records() -> None:
    """Put _TracebacksToLog on the handlers of MLflow's logger and the root logger (again after MLflow's import adds
    its own: tracking.start_run calls this too), and send uncaught thread tracebacks to the log file."""
    keep = _TracebacksToLog()
    for name in ("mlflow", "", "py.warnings"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _TracebacksToLog) for f in handler.filters):
                handler.addFilter(keep)
    threading.excepthook = lambda args: write_log(
        "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    )


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):  # its message is empty or a size: say what happened and what to do
        return "out of memory (MemoryError): lower seq_len, batch_size or num_samples, or use a machine with more"
    first = cause_line(exc) if str(exc).strip() else ""  # the cause, not a wrapper ("Query-invoked autoflush")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


# An `error:` line names values, never echoes them whole (errors.shown); a line that still grows past this (a
# problem per child of a 200-configuration sweep, a store listing a thousand names) is cut here.
MAX_ERROR_LINE = 2000


def terminal_line(message: str) -> str:
    """A message as the one line the terminal gets: secrets masked, control and bidirectional characters escaped
    (a newline or ESC in a name forged a second `error:` line), cut to MAX_ERROR_LINE characters."""
    line = printable(redact(message))
    return line if len(line) <= MAX_ERROR_LINE else f"{line[: MAX_ERROR_LINE - 40]}...<cut: {len(line):,} characters>"


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run an entry point's main; a UserError becomes `error: ...` on stderr and exit status 2. SIGTERM is
    handled like Ctrl-C, so `kill` leaves the run FAILED rather than RUNNING (kill -9 cannot be caught: a
    later command on the experiment marks those runs FAILED, tracking.fail_orphaned_runs). Any other exception
    is one `error:` line too, exit 2, its traceback in the log file (log_file()), never on the terminal."""
    signal.signal(signal.SIGTERM, _interrupt)
    quiet_log_records()
    with own_temp_folder():
        _run(main, sys.argv[1:] if argv is None else argv)


_TEMP_PREFIX = "lora-efficiency-"


@contextlib.contextmanager
def own_temp_folder():
    """Every temporary file of this process (adapters before upload, checkpoints, downloaded checkpoints, masked
    copies, MLflow's own downloads: whatever calls tempfile without a folder) goes into one folder of its own,
    removed when the command ends, also on failure. Folders left by processes killed with -9 (their pid gone)
    are removed by the next command."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{_TEMP_PREFIX}*-*"):
        pid = old.name.removeprefix(_TEMP_PREFIX).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}-", dir=base)
    previous, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield Path(folder)
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def temp_sibling(parent: Path, prefix: str) -> Path:
    """A new temporary folder in `parent` (to fill, then rename into place), named after its owner:
    `<prefix><pid>-<process start time>-<host>-<random>`. Leftovers of owners that are gone (remove_leftovers) are
    removed first: a `kill -9` between mkdtemp and the rename left its folder there for good."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(parent, prefix)
    owner = f"{os.getpid()}-{psutil.Process().create_time():.0f}-{socket.gethostname()}-"
    return Path(tempfile.mkdtemp(dir=parent, prefix=prefix + owner))


def remove_leftovers(parent: Path, prefix: str) -> None:
    """Remove the temp_sibling folders in `parent` whose process is gone: its pid dead, or reused by a process that
    started at another time. Never a live process's, another host's (a shared cache) or one named otherwise."""
    host = socket.gethostname()
    for folder in parent.glob(f"{glob.escape(prefix)}*"):
        pid, started, rest = (folder.name.removeprefix(prefix).split("-", 2) + ["", ""])[:3]
        if not (pid.isdigit() and started.isdigit() and rest.rpartition("-")[0] == host):
            continue
        try:
            gone = abs(psutil.Process(int(pid)).create_time() - int(started)) > 1.5  # the name keeps whole seconds
        except psutil.NoSuchProcess:
            gone = True
        except psutil.Error:  # AccessDenied: another user's live process
            gone = False
        if gone:
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _run(main: Callable[[list[str]], object], argv: list[str]) -> None:
    try:
        main(argv)
    except UserError as exc:
        message = terminal_line(str(exc).replace("\n", " "))
        if os.environ.get("RANK", "0") != "0" and "LOCAL_RANK" in os.environ:  # one rank of a distributed training
            message = f"rank {os.environ['RANK']}: {message}"
        if not isinstance(exc, TrackingError):  # else start_run has tried already; the store may be down
            _fail_active_run(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _fail_active_run("interrupted")
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # what no check foresaw: still one line, the details in the log file
        message = terminal_line(_one_line(exc))
        log = write_log("".join(traceback.format_exception(exc)))
        _fail_active_run(message)
        print(f"error: {message}" + (f" (traceback in {log})" if log else ""), file=sys.stderr)
        sys.exit(2)
