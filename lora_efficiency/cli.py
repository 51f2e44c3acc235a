"""How every entry point runs: bad input as one line and exit status 2, SIGTERM like Ctrl-C, no run left RUNNING."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

from lora_efficiency.errors import TrackingError, UserError
from lora_efficiency.redaction import redact


def _fail_active_run(message: str) -> None:
    """Mark the run FAILED (the one `mlflow run` opened, or ours) so nothing is left RUNNING."""
    import mlflow

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
        print(f"warning: could not mark run {run_id} FAILED: {exc}", file=sys.stderr)


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


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run an entry point's main; a UserError becomes `error: ...` on stderr and exit status 2. SIGTERM is
    handled like Ctrl-C, so `kill` leaves the run FAILED rather than RUNNING (kill -9 cannot be caught: a
    sweep restart marks those runs FAILED)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        message = redact(str(exc).replace("\n", " "))
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
