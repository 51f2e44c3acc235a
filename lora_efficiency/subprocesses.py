"""Child processes of this project (sweep children, benchmark workers): none outlives its parent, and each finds
the project's modules from any working folder."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when its parent dies (kill -9 included), so none outlives it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def child_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) with the project root first on PYTHONPATH, so `python -m
    entrypoints.train` and `-m lora_efficiency.bench` work from any working folder, plus `extra`."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
