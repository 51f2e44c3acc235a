"""How one sweep child runs, whichever backend places it: the `entrypoints.train` command line of a configuration,
the child's MLflow run created on the host that trains it, and the child as a process of its own.

The local backend (`run_here`, one child after another in this process) and lora_efficiency.ray_backend (the same
`run_job` as Ray tasks) both run children through this module; it imports neither of them, nor lora_efficiency.sweep.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lora_efficiency.subprocesses import child_env, die_with_parent

if TYPE_CHECKING:  # a Ray worker unpickling run_job imports this module alone, not config's model registry
    from lora_efficiency.config import TrainConfig

TRAIN_MODULE = "entrypoints.train"
# What a child's stderr keeps to name its error: a traceback of a few KB fits in 64 KB with room to spare.
STDERR_TAIL_BYTES = 65536


def flags(settings: Mapping[str, Any]) -> list[str]:
    """`--name value` for every setting, booleans as true/false: how every entry point takes its settings."""
    args = []
    for key, value in settings.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def train_args(config: TrainConfig, data: str) -> list[str]:
    """entrypoints.train's arguments for `config`, with `data` as its data."""
    return flags({**asdict(config), "data": data})


def _python_train(args: list[str]) -> list[str]:
    return [sys.executable, "-m", TRAIN_MODULE, *args]


def train_command(config: TrainConfig, data_path: str) -> list[str]:
    """The command line that trains `config` on `data_path` as a process of its own."""
    return _python_train(train_args(config, data_path))


@dataclass
class Job:
    """One child to run: where its run goes, what it runs, and the environment it adds to its host's."""

    name: str
    key: str
    experiment_id: str
    tags: dict[str, str]
    args: list[str]  # entrypoints.train's arguments
    env: dict[str, str]
    num_processes: int = 1  # training processes of the child (DDP when > 1): what a Ray task reserves per trial


@dataclass
class Outcome:
    run_id: str  # empty when the child's run was never created (its Ray worker died first)
    returncode: int
    stderr: str
    seconds: float


def _run_child(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run one child; its stderr (its step bar, warnings, a traceback) is passed through as it comes, and its
    tail kept to name the error. Returns the exit status and the last STDERR_TAIL_BYTES of stderr."""
    import subprocess
    import threading

    proc = subprocess.Popen(command, env=env, preexec_fn=die_with_parent, stderr=subprocess.PIPE)
    tail = bytearray()

    def forward() -> None:
        while chunk := os.read(proc.stderr.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail.extend(chunk)
            del tail[:-STDERR_TAIL_BYTES]

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    returncode = proc.wait()
    reader.join()
    proc.stderr.close()
    return returncode, tail.decode("utf-8", errors="replace")


def run_job(job: Job) -> Outcome:
    """Create the child's run here, on the host that trains it (so its start time and owner are the real ones),
    then run `python -m entrypoints.train` in a process of its own. The same function runs in the sweep's process
    (backend local) and as a Ray task (backend ray)."""
    import mlflow

    from lora_efficiency.tracking import owner_tags

    client = mlflow.MlflowClient(job.env.get("MLFLOW_TRACKING_URI"))
    run = client.create_run(job.experiment_id, run_name=job.name, tags={**job.tags, **owner_tags()})
    # the project root on PYTHONPATH: `-m entrypoints.train` from any working folder (a Ray worker's)
    env = child_env({**os.environ, **job.env}, MLFLOW_RUN_ID=run.info.run_id, MLFLOW_EXPERIMENT_ID=job.experiment_id)
    t0 = time.perf_counter()
    returncode, stderr = _run_child(_python_train(job.args), env)
    return Outcome(run.info.run_id, returncode, stderr, time.perf_counter() - t0)


def run_here(jobs: Iterable[Job]) -> Iterator[tuple[Job, Outcome]]:
    """The local backend: every job in this process's host, one after another, yielded as each one ends."""
    for job in jobs:
        yield job, run_job(job)
