"""Sweeps: a YAML file of configurations x seeds, expanded, checked up front, and run as MLflow child runs.

A sweep file names a base (overrides of configs/default.yaml's `train` section), the axes (a grid, or an
explicit list of configurations) and the seeds. Each (configuration, seed) is one child run of the sweep's
parent run, keyed by `sweep_key` = hash(settings, data fingerprint, seed): a key that already has a FINISHED
run in the experiment is skipped, so a sweep started again after a crash runs only what is missing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_efficiency.config import CONFIG_DIR, TrainConfig, build_config, is_path, read_defaults
from lora_efficiency.errors import ConfigError, UserError

SWEEP_KEYS = {"name", "base", "axes", "configurations", "seeds"}


@dataclass
class Child:
    name: str
    config: TrainConfig
    overrides: dict[str, Any]  # what differs from the sweep's base: the configuration's label


@dataclass
class Sweep:
    name: str
    path: str
    children: list[Child]
    seeds: list[int] = field(default_factory=list)

    @property
    def configurations(self) -> int:
        return len(self.children) // max(len(self.seeds), 1)


def _read_yaml(path: Path, what: str) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{what}={str(path)!r} could not be read as YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{what}={str(path)!r} must hold a mapping, found {type(loaded).__name__}")
    return loaded


def load_profile(profile: str) -> dict:
    """A profile (configs/profiles/<name>.yaml): training-budget overrides (`train`) and `seeds`."""
    if not profile:
        return {}
    path = CONFIG_DIR / "profiles" / f"{profile}.yaml"
    if not re.fullmatch(r"\w[\w.-]*", profile) or not is_path(path, "file"):  # a name, never a path elsewhere
        known = sorted(p.stem for p in (CONFIG_DIR / "profiles").glob("*.yaml"))
        raise UserError(f"profile={profile!r} is invalid: one of {', '.join(known)} or empty")
    return _read_yaml(path, "profile")


def load_sweep(path: str | Path, *, profile: str = "", overrides: dict[str, Any] | None = None) -> Sweep:
    """Expand a sweep file into children and check every one of them before anything runs."""
    path = Path(path)
    spec = _read_yaml(path, "config")
    problems = [
        f"config={str(path)!r}: unknown key {k!r}: allowed are {', '.join(sorted(SWEEP_KEYS))}"
        for k in spec
        if k not in SWEEP_KEYS
    ]
    if ("axes" in spec) == ("configurations" in spec):
        problems.append(
            f"config={str(path)!r}: give either axes (a grid) or configurations (a list), not both or neither"
        )
    if problems:
        raise ConfigError(problems)
    prof = load_profile(profile)
    base = {**read_defaults("train"), **(spec.get("base") or {}), **(prof.get("train") or {}), **(overrides or {})}
    seeds = prof.get("seeds", spec.get("seeds", [base["seed"]]))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError([f"seeds={seeds!r} is invalid: a non-empty list of integers >= 0"])
    if "axes" in spec:
        axes = spec["axes"]
        if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
            raise ConfigError([f"axes={axes!r} is invalid: a mapping of setting -> non-empty list of values"])
        variants = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    else:
        variants = spec["configurations"]
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants) or not variants:
            raise ConfigError([f"configurations={variants!r} is invalid: a non-empty list of mappings"])
    children, problems = [], []
    for variant in variants:
        label = ",".join(f"{k}={v}" for k, v in variant.items()) or "base"
        for seed in seeds:
            try:
                config = build_config(TrainConfig, {**base, **variant, "seed": seed})
            except ConfigError as exc:
                problems += [f"[{label}] {p}" for p in exc.problems]
                continue
            children.append(Child(f"{label},seed={seed}", config, variant))
    if problems:
        raise ConfigError(sorted(set(problems)))
    return Sweep(spec.get("name", path.stem), str(path), children, seeds)


def sweep_key(config: TrainConfig, data_fingerprint: str) -> str:
    """What identifies one child across restarts: every setting but the device and the checkpointing, the data by
    content, the seed."""
    left_out = ("device", "data", "checkpoint_every", "resume_from")
    settings = {k: v for k, v in asdict(config).items() if k not in left_out}
    if settings["num_processes"] == 1:  # keys of single-process runs stay those made before the setting existed
        del settings["num_processes"]
    payload = json.dumps({**settings, "data_fingerprint": data_fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def owner_tags() -> dict[str, str]:
    """Who runs a child: a RUNNING child whose process is gone on this host is stale."""
    return {"owner_host": socket.gethostname(), "owner_pid": str(os.getpid())}


def is_stale(tags: dict[str, str]) -> bool:
    if tags.get("owner_host") != socket.gethostname():
        return False  # another machine's sweep: not ours to judge
    try:
        os.kill(int(tags.get("owner_pid", "0")), 0)
    except (ProcessLookupError, ValueError):
        return True
    except PermissionError:
        return False
    return False


class Eta:
    """Remaining time from the measured durations of the children run so far (skipped ones cost nothing, so
    tqdm's own rate, which counts them, would be wrong)."""

    def __init__(self, total: int):
        self.total, self.done, self.seconds = total, 0, []

    def update(self, seconds: float | None) -> None:
        self.done += 1
        if seconds is not None:
            self.seconds.append(seconds)

    def eta(self) -> str:
        left = self.total - self.done
        return f"ETA {left * sum(self.seconds) / len(self.seconds) / 60:.1f} min" if self.seconds else ""

    def line(self, name: str) -> str:
        eta = self.eta()
        return f"[{name}] {self.done}/{self.total} done" + (f", {eta}" if eta else "")


def now() -> float:
    return time.perf_counter()


@dataclass
class SweepResult:
    total: int
    finished: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)  # sweep_key -> run id of its FINISHED run


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the sweep dies (kill -9 included), so none outlives it."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _train_args(config: TrainConfig, data: str) -> list[str]:
    args = []
    for key, value in asdict(config).items():
        value = data if key == "data" else value
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def _train_command(config: TrainConfig, data_path: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "entrypoints.train", *_train_args(config, data_path)]


def _run_child(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run one child; its stderr (its step bar, warnings, a traceback) is passed through as it comes, and its
    tail kept to name the error. Returns the exit status and the last 64 KB of stderr."""
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent, stderr=subprocess.PIPE)
    tail = bytearray()

    def forward() -> None:
        while chunk := os.read(proc.stderr.fileno(), 65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail.extend(chunk)
            del tail[:-65536]

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    returncode = proc.wait()
    reader.join()
    proc.stderr.close()
    return returncode, tail.decode("utf-8", errors="replace")


@dataclass
class Job:
    """One child to run: where its run goes, what it runs, and the environment it adds to its host's."""

    name: str
    key: str
    experiment_id: str
    tags: dict[str, str]
    args: list[str]  # entrypoints.train's arguments
    env: dict[str, str]


@dataclass
class Outcome:
    run_id: str  # empty when the child's run was never created (its Ray worker died first)
    returncode: int
    stderr: str
    seconds: float


def run_job(job: Job) -> Outcome:
    """Create the child's run here, on the host that trains it (so its start time and owner are the real ones),
    then run `python -m entrypoints.train` in a process of its own. The same function runs in the sweep's process
    (backend local) and as a Ray task (backend ray)."""
    import sys

    import mlflow

    client = mlflow.MlflowClient(job.env.get("MLFLOW_TRACKING_URI"))
    run = client.create_run(job.experiment_id, run_name=job.name, tags={**job.tags, **owner_tags()})
    env = {**os.environ, **job.env, "MLFLOW_RUN_ID": run.info.run_id, "MLFLOW_EXPERIMENT_ID": job.experiment_id}
    root = str(Path(__file__).resolve().parents[1])  # `-m entrypoints.train` from any working folder
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    t0 = now()
    returncode, stderr = _run_child([sys.executable, "-m", "entrypoints.train", *job.args], env)
    return Outcome(run.info.run_id, returncode, stderr, now() - t0)


def predicted_peaks(sweep: Sweep, data_path: str) -> dict[str, float | None]:
    """The memory planner's peak for every child (by name), before any runs: None where it cannot tell."""
    from lora_efficiency import data as D
    from lora_efficiency.models import resolve_model
    from lora_efficiency.planner import predict_peak_mb
    from lora_efficiency.prepare import load_prepared
    from lora_efficiency.trainer import resolve_device

    train_split = load_prepared(data_path).train
    fractions: dict[tuple[int, bool], float] = {}
    out: dict[str, float | None] = {}
    for child in sweep.children:
        c = child.config
        if (c.seq_len, c.packing) not in fractions:
            rows = D.pack(train_split, seq_len=c.seq_len) if c.packing else D.unpacked(train_split)
            fractions[c.seq_len, c.packing] = D.target_fraction(rows, seq_len=c.seq_len)
        out[child.name] = predict_peak_mb(
            resolve_model(c.model).path,
            rows_target_fraction=fractions[c.seq_len, c.packing],
            device=resolve_device(c.device),
            trust_remote_code=c.trust_remote_code,
            rank=c.rank,
            target_modules=c.target_modules,
            quantization=c.quantization,
            double_quant=c.double_quant,
            batch_size=c.batch_size,
            seq_len=c.seq_len,
            gradient_checkpointing=c.gradient_checkpointing,
            dropout=c.dropout,
        )
    return out


def mark_stale_runs(client, experiment_id: str) -> int:
    """Runs left RUNNING by a sweep whose process is gone on this host -> FAILED."""
    stale = 0
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000):
        if "owner_pid" in run.data.tags and is_stale(run.data.tags):
            client.set_tag(run.info.run_id, "error", "stale: the sweep that ran it died (marked on restart)")
            client.set_terminated(run.info.run_id, "FAILED")
            stale += 1
    return stale


def finished_keys(client, experiment_id: str) -> dict[str, str]:
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000)
    return {r.data.tags["sweep_key"]: r.info.run_id for r in runs if "sweep_key" in r.data.tags}


def run_sweep(
    sweep: Sweep,
    *,
    parent_run_id: str,
    data_fingerprint: str,
    data_path: str,
    backend: str = "local",
    ray_address: str = "",
    max_concurrent: int = 0,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: str = "auto",
    log=print,
) -> SweepResult:
    """Run every child not already FINISHED, each in its own process, as a child run of `parent_run_id`.

    One process per child costs ~7 s (imports, model load) but keeps memory figures honest: in one long process
    the heap a bf16 child leaves behind raises the next child's measured peak RSS. A child that fails (an
    exception, an out-of-memory kill) is marked FAILED with its error and the sweep goes on. A child the memory
    planner predicts will not fit the device's available memory is announced with a warning, then tried.

    backend "local" runs the children one after another here; "ray" runs them as Ray tasks, concurrently as far
    as `cpus_per_trial`/`gpus_per_trial` and `max_concurrent` (0: no cap) allow, on a local Ray instance
    (`ray_address` empty) or the cluster at `ray_address`; lora_efficiency.ray_backend says what travels.
    On a terminal (local backend): a bar for the sweep and one per child for its steps; elsewhere, plain lines.
    """
    import mlflow

    from lora_efficiency import progress
    from lora_efficiency.planner import available_mb
    from lora_efficiency.trainer import resolve_device

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    bar = None
    if progress.bars_wanted() and backend == "local":  # concurrent children: no bars, their lines interleave
        bar = progress.bar(total=len(sweep.children), desc=f"sweep {sweep.name}", unit="run", position=0)
    say = bar.write if bar is not None else log
    stale = mark_stale_runs(client, experiment_id)
    if stale:
        say(f"[{sweep.name}] marked {stale} stale RUNNING run(s) of a dead sweep FAILED")
    done = finished_keys(client, experiment_id)
    todo = [c for c in sweep.children if sweep_key(c.config, data_fingerprint) not in done]
    predicted = predicted_peaks(Sweep(sweep.name, sweep.path, todo, sweep.seeds), data_path) if todo else {}
    result, eta = SweepResult(len(sweep.children)), Eta(len(sweep.children))
    jobs = []
    remote = backend == "ray" and bool(ray_address)  # another machine: it resolves the data reference itself
    env = {
        "MLFLOW_TRACKING_URI": absolute_tracking_uri(mlflow.get_tracking_uri()),
        "MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING"),  # not 5 INFO lines a child
        progress.PROGRESS_ENV: "bar" if bar is not None else "lines",
        progress.BAR_POSITION_ENV: "1",
    }
    for child in sweep.children:
        key = sweep_key(child.config, data_fingerprint)
        if key in done:
            result.skipped += 1
            result.runs[key] = done[key]
            eta.update(None)
            say(f"{eta.line(sweep.name)}: {child.name} already FINISHED ({done[key]}), skipped")
            if bar is not None:
                bar.update(1)
            continue
        need_mb, have_mb = predicted.get(child.name), available_mb(resolve_device(child.config.device))
        if need_mb is not None and need_mb > have_mb:
            say(
                f"[{sweep.name}] warning: {child.name} is predicted to need {need_mb:,.0f} MB, the device has "
                f"{have_mb:,.0f} MB available: it may run out of memory (trying it anyway)"
            )
        tags = {
            "mlflow.parentRunId": parent_run_id,
            "sweep_name": sweep.name,
            "sweep_key": key,
            "sweep_configuration": child.name,
            "seed": str(child.config.seed),
            "sweep_backend": backend,
        }
        args = _train_args(child.config, child.config.data if remote else data_path)
        jobs.append(Job(child.name, key, experiment_id, tags, args, env))
    if backend == "ray":
        from lora_efficiency.ray_backend import run_jobs

        outcomes = run_jobs(
            jobs,
            address=ray_address,
            max_concurrent=max_concurrent,
            cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial,
            say=say,
        )
    else:
        outcomes = ((job, run_job(job)) for job in jobs)
    for job, outcome in outcomes:
        status = client.get_run(outcome.run_id).info.status if outcome.run_id else "NONE"
        eta.update(outcome.seconds)
        if outcome.returncode == 0 and status == "FINISHED":
            result.finished += 1
            result.runs[job.key] = outcome.run_id
            say(f"{eta.line(sweep.name)}: {job.name} FINISHED in {outcome.seconds:.0f} s")
        else:
            lines = [line for line in outcome.stderr.splitlines() if line.strip()]
            error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
            if outcome.returncode < 0:
                error = f"killed by signal {-outcome.returncode} (out of memory?) {error}".strip()
            if outcome.run_id:
                client.set_tag(outcome.run_id, "error", error[:5000] or f"exit status {outcome.returncode}")
                if client.get_run(outcome.run_id).info.status == "RUNNING":
                    client.set_terminated(outcome.run_id, "FAILED")
            result.failed += 1
            result.failures.append(f"{job.name}: {error}")
            say(f"{eta.line(sweep.name)}: {job.name} FAILED: {error}")
        if bar is not None:
            bar.set_postfix_str(eta.eta(), refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    return result


def absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` (relative to the working folder) as an absolute URI, so a child started anywhere
    (a Ray worker's folder) writes to the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri
