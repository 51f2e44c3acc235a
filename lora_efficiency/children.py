"""How one sweep child runs, whichever backend places it: its settings file (written on the host that trains it, so
its command line is `python -m entrypoints.train --config <that file>`, a file a person can open and rerun), the
child's MLflow run created on that host, and the child as a process of its own.

The local backend (`run_here`, one child after another in this process) and lora_efficiency.ray_backend (the same
`run_job` as Ray tasks) both run children through this module; it imports neither of them, nor lora_efficiency.sweep.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_efficiency.forkserver import PRELOAD, ForkServer
from lora_efficiency.redaction import mask_stored
from lora_efficiency.subprocesses import child_env, die_with_parent

TRAIN_MODULE = "entrypoints.train"
# What a child's stderr keeps to name its error: a traceback of a few KB fits in 64 KB with room to spare.
STDERR_TAIL_BYTES = 65536


def flags(settings: Mapping[str, Any]) -> list[str]:
    """`--name value` for every setting, booleans as true/false: how every entry point takes its settings."""
    args = []
    for key, value in settings.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def _python_train(args: list[str]) -> list[str]:
    return [sys.executable, "-m", TRAIN_MODULE, *args]


@dataclass
class Job:
    """One child to run: where its run goes, what it runs, and the environment it adds to its host's."""

    name: str
    key: str
    experiment_id: str
    tags: dict[str, str]
    settings: str  # the child's settings file (config.settings_text): its every train setting, the data as prepared
    env: dict[str, str]
    num_processes: int = 1  # training processes of the child (DDP when > 1): what a Ray task reserves per trial


@dataclass
class Outcome:
    run_id: str  # empty when the child's run was never created (its Ray worker died first)
    returncode: int
    stderr: str
    seconds: float
    claimed_by: str = ""  # not run: the run of another sweep that claimed the same sweep_key first (claim)


class _Stderr:
    """Reads a child's stderr (its step bar, warnings, a traceback) to its end, passing it through as it comes and
    keeping its last STDERR_TAIL_BYTES to name the error."""

    def __init__(self) -> None:
        self.tail = bytearray()

    def __call__(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            self.tail.extend(chunk)
            del self.tail[:-STDERR_TAIL_BYTES]

    def text(self) -> str:
        return self.tail.decode("utf-8", errors="replace")


def _run_child(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `python -m entrypoints.train args` as a fresh process. Returns its exit status and its stderr's tail."""
    proc = subprocess.Popen(_python_train(args), env=env, preexec_fn=die_with_parent, stderr=subprocess.PIPE)
    stderr = _Stderr()
    reader = threading.Thread(target=stderr, args=(proc.stderr.fileno(),), daemon=True)
    reader.start()
    returncode = proc.wait()
    reader.join()
    proc.stderr.close()
    return returncode, stderr.text()


class WarmChildren:
    """Runs children as forks of one lora_efficiency.forkserver (the training stack imported once), started at the
    first child and again whenever a child's environment differs from its; fresh processes where the server finds
    forking unsafe (said once on stderr). A context manager: the server ends with it."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        self.server: ForkServer | None = None
        self.unsafe = ""
        self.preload = preload

    def start(self, env: dict[str, str]) -> bool:
        """A server for children of environment `env` (run ids aside) up and ready; False where forking is off."""
        if self.unsafe:
            return False
        if self.server is None or not self.server.serves(env):
            self.close()
            self.server = ForkServer(env, self.preload)
            if self.server.unsafe:
                self.unsafe = self.server.unsafe
                print(f"warm children off ({self.unsafe}): each child starts a fresh process", file=sys.stderr)
                self.close()
                return False
        return True

    def __call__(self, args: list[str], env: dict[str, str]) -> tuple[int, str]:
        if not self.start(env):
            return _run_child(args, env)
        stderr = _Stderr()
        return self.server.run(TRAIN_MODULE, args, env, stderr), stderr.text()

    def close(self, stop_child: bool = False) -> None:
        if self.server is not None:
            self.server.close(stop_child)
            self.server = None

    def __enter__(self) -> WarmChildren:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # interrupted (Ctrl-C, SIGTERM, the sweep's generator closed early): the running child gets a SIGTERM and
        # marks its run FAILED (a fresh child dies with its parent by SIGKILL, its run left to the next command)
        self.close(stop_child=exc_type is not None)


def run_job(job: Job, launch: Callable[[list[str], dict[str, str]], tuple[int, str]] = _run_child) -> Outcome:
    """Create the child's run here, on the host that trains it (so its start time and owner are the real ones),
    write its settings file here, then run `python -m entrypoints.train --config <it>` in a process of its own: a
    fresh one (`_run_child`, what a Ray task does) or a fork of a warm server (WarmChildren, the local backend's
    default). The same function runs in the sweep's process (backend local) and as a Ray task (backend ray). The
    file lives while the child runs; the child logs the same settings as its run's settings.yaml, which lasts."""
    import mlflow  # lazy: a Ray worker unpickling run_job imports this module before it needs MLflow (~1 s)

    from lora_efficiency.tracking import owner_tags  # lazy: imports MLflow (above)

    client = mlflow.MlflowClient(job.env.get("MLFLOW_TRACKING_URI"))
    tags = {k: mask_stored(str(v)) for k, v in {**job.tags, **owner_tags()}.items()}  # as MlflowTracker stores them
    run, winner = claim(
        client,
        job.experiment_id,
        job.key,
        lambda: client.create_run(job.experiment_id, run_name=mask_stored(job.name), tags=tags),
    )
    if run is None:
        return Outcome("", 0, "", 0.0, claimed_by=winner)
    # the project root on PYTHONPATH: `-m entrypoints.train` from any working folder (a Ray worker's)
    env = child_env({**os.environ, **job.env}, MLFLOW_RUN_ID=run.info.run_id, MLFLOW_EXPERIMENT_ID=job.experiment_id)
    with tempfile.TemporaryDirectory(prefix=f"sweep-child-{run.info.run_id[:8]}-") as folder:
        settings = Path(folder) / "settings.yaml"
        settings.write_text(job.settings, encoding="utf-8")
        t0 = time.perf_counter()
        returncode, stderr = launch(["--config", str(settings)], env)
    return Outcome(run.info.run_id, returncode, stderr, time.perf_counter() - t0)


# Rounds of claim, look, withdraw before a sweep leaves a configuration to the other claimant: two claimants collide
# again only when both look inside the same ~0.1 s of a backoff drawn from up to CLAIM_BACKOFF_S * 2**round.
CLAIM_ROUNDS = 8
CLAIM_BACKOFF_S = 0.3
# A claim that sees another is deleted right after one look (one search of the store); a winning claim stays
# RUNNING while its child trains. A sweep that finds live claims looks again this much later and names one still
# there. (Was: it named the first it saw, which could be a claim withdrawing beside the one
# that then won: a three-sweep collision in CI, 2026-12-05, named a deleted run.)
CLAIM_SETTLE_S = 1.0


def claim(client, experiment_id: str, key: str, create_run: Callable[[], Any]) -> tuple[Any, str]:
    """The store as the lock: (our run, "") when the run created for `key` (its `sweep_key` tag, our claim) may train
    it, else (None, the run id that does): a FINISHED run of `key` or another live claim.

    A claim wins only when, created, it sees no other live claim; otherwise it is withdrawn (deleted, so no report
    counts it). Two winners would each have looked before the other's claim existed, which cannot be: each creates
    its claim before it looks. (Was: the earliest claim by start time won, so a claim stamped earlier but stored
    later won beside one that never saw it, and both trained: CI, 2026-12-05.) Two claims that see each other both
    withdraw; each waits a random backoff and looks again: a claim there that is still there CLAIM_SETTLE_S later
    is the winner, so we leave it the key and name it; none there, or none that stayed, we claim again. A claim
    whose owner was killed is no claim (tracking.owner_gone; the orphan sweep marks it FAILED); one from another
    host counts while RUNNING."""
    rng = random.Random()  # not the global generator: a seeded run's draws stay its own
    others: list[str] = []
    for round_ in range(CLAIM_ROUNDS):
        ours = create_run()
        finished, others = _claims(client, experiment_id, key, ours.info.run_id)
        if not finished and (not others or round_ == CLAIM_ROUNDS - 1):  # the last round trains rather than drop it
            return ours, ""
        client.delete_run(ours.info.run_id)
        if finished:
            return None, finished[0]
        time.sleep(rng.uniform(0.0, CLAIM_BACKOFF_S * 2**round_))
        finished, others = _claims(client, experiment_id, key, "")
        if others and not finished:  # a winner, or claims about to withdraw: the winner is the one that stays
            time.sleep(CLAIM_SETTLE_S)
            finished, still = _claims(client, experiment_id, key, "")
            others = [r for r in others if r in still]
        if finished or others:
            return None, (finished or others)[0]
    raise AssertionError("unreachable: the last round returns")


def _claims(client, experiment_id: str, key: str, ours: str) -> tuple[list[str], list[str]]:
    """The FINISHED runs of `key`, and the other live claims on it, earliest first."""
    from lora_efficiency.tracking import owner_gone  # lazy: imports MLflow (run_job says why that waits)

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.sweep_key = '{key}'",
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    finished = [r.info.run_id for r in runs if r.info.status == "FINISHED"]
    live = [
        r.info.run_id
        for r in runs
        if r.info.run_id != ours
        and r.info.status == "RUNNING"
        and "owner_pid" in r.data.tags
        and not owner_gone(r.data.tags)
    ]
    return finished, live


def run_here(jobs: Iterable[Job], *, warm: bool = True) -> Iterator[tuple[Job, Outcome]]:
    """The local backend: every job in this process's host, one after another, yielded as each one ends; each a
    fork of a warm server (`warm`, WarmChildren) or a fresh process."""
    with WarmChildren() if warm else contextlib.nullcontext(_run_child) as launch:
        for job in jobs:
            yield job, run_job(job, launch)
