"""Sweeps: a YAML file of configurations x seeds, expanded, checked up front, and run as MLflow child runs.

A sweep file names a base (overrides of configs/default.yaml's `train` section), the axes (a grid, or an
explicit list of configurations) and the seeds. Each (configuration, seed) is one child run of the sweep's
parent run, keyed by `sweep_key` = hash(settings, data fingerprint, seed): a key that already has a FINISHED
run in the experiment is skipped, so a sweep started again after a crash runs only what is missing.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lora_efficiency import progress
from lora_efficiency.children import Job, Outcome, is_stale, run_here, train_args
from lora_efficiency.children import train_command as _train_command  # noqa: F401 - old bench.py's; drop with it
from lora_efficiency.config import CONFIG_DIR, TrainConfig, build_config, is_path, read_defaults
from lora_efficiency.configuration import planner_inputs, sweep_key
from lora_efficiency.errors import ConfigError, UserError

if TYPE_CHECKING:
    from lora_efficiency.prepare import Prepared

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


def check_one_data(sweeps: list[Sweep], *, where: str, what: str = "a sweep") -> None:
    """Every child of `sweeps` trains on the one prepared data set: the settings that shape it must agree."""
    shapes = {
        (c.config.data, c.config.model, c.config.seq_len, c.config.train_on_prompt)
        for sweep in sweeps
        for c in sweep.children
    }
    if len(shapes) > 1:
        raise UserError(
            f"{where}: {what} prepares its data once, so data, model, seq_len and train_on_prompt must be the same "
            "in every configuration"
        )


def prepare_once(sweeps: list[Sweep], *, where: str, what: str = "a sweep") -> Prepared:
    """Check that `sweeps` share one data set (check_one_data), then prepare it (cached): a Prepared."""
    from lora_efficiency.models import load_tokenizer, resolve_model
    from lora_efficiency.prepare import resolve_data

    check_one_data(sweeps, where=where, what=what)
    first = sweeps[0].children[0].config
    source = resolve_model(first.model)
    return resolve_data(
        first.data,
        model=source,
        tokenizer=load_tokenizer(source),
        seq_len=first.seq_len,
        train_on_prompt=first.train_on_prompt,
    )


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


@dataclass
class SweepResult:
    total: int
    finished: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)  # sweep_key -> run id of its FINISHED run

    def tags(self) -> dict[str, str]:
        """The counts a sweep's parent run is tagged with (by `sweep` and by every sweep of the study)."""
        return {
            "children_total": str(self.total),
            "children_finished": str(self.finished),
            "children_skipped": str(self.skipped),
            "children_failed": str(self.failed),
        }


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
            **planner_inputs(asdict(c)),
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
    log: Callable[[str], None] = print,
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

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    shown = _Progress(sweep, bars=progress.bars_wanted() and backend == "local", log=log)  # concurrent: lines
    stale = mark_stale_runs(client, experiment_id)
    if stale:
        shown.say(f"[{sweep.name}] marked {stale} stale RUNNING run(s) of a dead sweep FAILED")
    done = finished_keys(client, experiment_id)
    todo = [c for c in sweep.children if sweep_key(c.config, data_fingerprint) not in done]
    predicted = predicted_peaks(Sweep(sweep.name, sweep.path, todo, sweep.seeds), data_path) if todo else {}
    place = _Placement(parent_run_id, experiment_id, backend, _children_env(bars=shown.bar is not None))
    jobs = []
    for child in sweep.children:
        key = sweep_key(child.config, data_fingerprint)
        if key in done:
            shown.skipped(child.name, key, done[key])
            continue
        _warn_if_too_big(child, predicted.get(child.name), shown.say, sweep.name)
        data = child.config.data if backend == "ray" and ray_address else data_path  # a cluster resolves its own
        jobs.append(_job(sweep.name, child, key, data, place))
    runs = _backend(backend, ray_address, max_concurrent, cpus_per_trial, gpus_per_trial, shown.say)
    for job, outcome in runs(jobs):
        _record(client, job, outcome, shown)
    shown.close()
    return shown.result


class _Progress:
    """What a sweep shows and counts as its children end: a bar on a terminal (else plain lines through `log`),
    the ETA, and the SweepResult."""

    def __init__(self, sweep: Sweep, *, bars: bool, log: Callable[[str], None]):
        self.name, total = sweep.name, len(sweep.children)
        self.bar = progress.bar(total=total, desc=f"sweep {sweep.name}", unit="run", position=0) if bars else None
        self.say = self.bar.write if self.bar is not None else log
        self.result, self.eta = SweepResult(total), Eta(total)

    def skipped(self, child_name: str, key: str, run_id: str) -> None:
        self.result.skipped += 1
        self.result.runs[key] = run_id
        self.eta.update(None)
        self.say(f"{self.eta.line(self.name)}: {child_name} already FINISHED ({run_id}), skipped")
        if self.bar is not None:
            self.bar.update(1)

    def ended(self, job: Job, outcome: Outcome, error: str | None) -> None:
        """`error` None: the child FINISHED."""
        self.eta.update(outcome.seconds)
        if error is None:
            self.say(f"{self.eta.line(self.name)}: {job.name} FINISHED in {outcome.seconds:.0f} s")
        else:
            self.say(f"{self.eta.line(self.name)}: {job.name} FAILED: {error}")
        if self.bar is not None:
            self.bar.set_postfix_str(self.eta.eta(), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class _Placement:
    """Where every child's run goes and what it runs with: the same for all the children of one sweep."""

    parent_run_id: str
    experiment_id: str
    backend: str
    env: dict[str, str]


def _children_env(*, bars: bool) -> dict[str, str]:
    """What each child's environment adds to its host's: the store (absolute, for a child started anywhere) and
    how it shows progress (its step bar under the sweep's, or lines)."""
    import mlflow

    return {
        "MLFLOW_TRACKING_URI": absolute_tracking_uri(mlflow.get_tracking_uri()),
        "MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING"),  # not 5 INFO lines a child
        progress.PROGRESS_ENV: "bar" if bars else "lines",
        progress.BAR_POSITION_ENV: "1",
    }


def _warn_if_too_big(child: Child, need_mb: float | None, say: Callable[[str], None], sweep_name: str) -> None:
    from lora_efficiency.planner import available_mb
    from lora_efficiency.trainer import resolve_device

    have_mb = available_mb(resolve_device(child.config.device))
    if need_mb is not None and need_mb > have_mb:
        say(
            f"[{sweep_name}] warning: {child.name} is predicted to need {need_mb:,.0f} MB, the device has "
            f"{have_mb:,.0f} MB available: it may run out of memory (trying it anyway)"
        )


def _job(sweep_name: str, child: Child, key: str, data: str, place: _Placement) -> Job:
    tags = {
        "mlflow.parentRunId": place.parent_run_id,
        "sweep_name": sweep_name,
        "sweep_key": key,
        "sweep_configuration": child.name,
        "seed": str(child.config.seed),
        "sweep_backend": place.backend,
    }
    args = train_args(child.config, data)
    return Job(child.name, key, place.experiment_id, tags, args, place.env, child.config.num_processes)


def _backend(
    backend: str,
    ray_address: str,
    max_concurrent: int,
    cpus_per_trial: float,
    gpus_per_trial: str,
    say: Callable[[str], None],
) -> Callable[[list[Job]], Iterable[tuple[Job, Outcome]]]:
    """What runs the jobs and yields (job, outcome) as each one ends: children.run_here, or Ray tasks."""
    if backend != "ray":
        return run_here
    # imported only for backend ray: importing ray_backend sets RAY_DEDUP_LOGS, which local children need not see
    from lora_efficiency.ray_backend import run_jobs

    return functools.partial(
        run_jobs,
        address=ray_address,
        max_concurrent=max_concurrent,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        say=say,
    )


def _record(client, job: Job, outcome: Outcome, shown: _Progress) -> None:
    """Count a child that ended; a failed one's run gets its error tag and is marked FAILED if still RUNNING."""
    status = client.get_run(outcome.run_id).info.status if outcome.run_id else "NONE"
    result = shown.result
    if outcome.returncode == 0 and status == "FINISHED":
        result.finished += 1
        result.runs[job.key] = outcome.run_id
        shown.ended(job, outcome, None)
        return
    error = _child_error(outcome)
    if outcome.run_id:
        client.set_tag(outcome.run_id, "error", error[:5000] or f"exit status {outcome.returncode}")
        if client.get_run(outcome.run_id).info.status == "RUNNING":
            client.set_terminated(outcome.run_id, "FAILED")
    result.failed += 1
    result.failures.append(f"{job.name}: {error}")
    shown.ended(job, outcome, error)


def _child_error(outcome: Outcome) -> str:
    """The child's `error:` line (run_cli's one-line error), else its last line of stderr; a signal is named."""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
    if outcome.returncode < 0:
        error = f"killed by signal {-outcome.returncode} (out of memory?) {error}".strip()
    return error


def absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` (relative to the working folder) as an absolute URI, so a child started anywhere
    (a Ray worker's folder) writes to the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri
