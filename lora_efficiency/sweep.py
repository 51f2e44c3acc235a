"""Sweeps: a YAML file of configurations x seeds, expanded, checked up front, and run as MLflow child runs.

A sweep file names a base (overrides of configs/default.yaml's `train` section), the axes (a grid, or an
explicit list of configurations) and the seeds. Each (configuration, seed) is one child run of the sweep's
parent run, keyed by `sweep_key` = hash(settings, data fingerprint, seed): a key that already has a FINISHED
run in the experiment is skipped, so a sweep started again after a crash runs only what is missing.

With an `lr_grid` (lora_efficiency.lr_tuning) a sweep runs in two phases: first one pilot child per learning rate
of each configuration, then every seed of each configuration at the learning rate its pilots chose.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow

from lora_efficiency import data as D
from lora_efficiency import planner, progress
from lora_efficiency.children import Job, Outcome, run_here
from lora_efficiency.config import (
    CONFIG_DIR,
    TrainConfig,
    build_config,
    is_path,
    read_defaults,
    read_mapping,
    settings_text,
)
from lora_efficiency.configuration import planner_inputs, sweep_key
from lora_efficiency.devices import resolve_device
from lora_efficiency.errors import ConfigError, UserError, invalid, printable, shown
from lora_efficiency.lr_tuning import (
    GROUP,
    LR_KEYS,
    Choice,
    LrGrid,
    NoLearningRate,
    PilotResult,
    beyond_edge,
    check_grid_fits,
    choose_lr,
    fmt_lr,
    group_id,
    lr_settings,
    main_tags,
    pilot_config,
    pilot_key,
    pilot_tags,
)
from lora_efficiency.models import load_tokenizer, local_revision, resolve_model
from lora_efficiency.names import preferred_name
from lora_efficiency.planner import predict_peak_mb
from lora_efficiency.prepare import load_prepared, resolve_data
from lora_efficiency.ray_backend import run_jobs
from lora_efficiency.redaction import redact
from lora_efficiency.tracking import fail_orphaned_runs

if TYPE_CHECKING:
    from lora_efficiency.prepare import Prepared

SWEEP_KEYS = {"name", "base", "axes", "configurations", "seeds", "max_runs", *LR_KEYS}
# A sweep of more runs than this (configurations x seeds, before the learning-rate pilots) must say so in its file
# (`max_runs: N`, N >= its size): a typo in an axis (10,000 configurations) should not start days of training.
MAX_RUNS_UNASKED = 200
ALIASES_TAG = "target_modules_aliases"  # a sweep run's, JSON: {"all_linear": ["attention_mlp"]} (trained as: also)


@dataclass
class Child:
    name: str
    config: TrainConfig
    overrides: dict[str, Any]  # what differs from the sweep's base: the configuration's label

    @property
    def label(self) -> str:
        """The configuration (without the seed): `rank=8`, or `base`."""
        return ",".join(f"{k}={v}" for k, v in self.overrides.items()) or "base"


@dataclass
class Sweep:
    name: str
    path: str
    children: list[Child]
    seeds: list[int] = field(default_factory=list)
    lr_grid: LrGrid | None = None  # None: every configuration trains at its own `lr`, no pilots
    # target_modules trained under another name (one_per_resolved_modules): the name trained -> the names it stands for
    aliases: dict[str, list[str]] = field(default_factory=dict)

    def alias_lines(self) -> list[str]:
        """What the sweep trains once for several target_modules names, as lines to print."""
        return [
            f"[{self.name}] target_modules {', '.join(also)} adapt the same modules as {name} on this model: "
            f"trained once, as {name}"
            for name, also in self.aliases.items()
        ]

    @property
    def configurations(self) -> int:
        return len(self.children) // max(len(self.seeds), 1)

    def first_seed_children(self) -> list[Child]:
        """One child per configuration: the one of the first seed (its pilots train from it, at pilot_seed if set)."""
        first = self.seeds[0] if self.seeds else None
        return [c for c in self.children if first is None or c.config.seed == first]

    @property
    def axes(self) -> str:
        """What varies between this sweep's configurations (every key of any configuration's label, `lr` when
        the learning rate is tuned per configuration), comma-separated: the sweep run's `sweep_axes` tag. The
        report holds everything else fixed when it joins runs a resumed sweep skipped (report.runs)."""
        keys = {k for c in self.children for k in c.overrides} | ({"lr"} if self.lr_grid is not None else set())
        return ",".join(sorted(keys))

    @property
    def pilots(self) -> int:
        """Pilot runs of the learning-rate grid: one per configuration and learning rate."""
        if self.lr_grid is None:
            return 0
        return sum(len(self.lr_grid.for_method(c.config.method) or ()) for c in self.first_seed_children())


def load_profile(profile: str) -> dict:
    """A profile (configs/profiles/<name>.yaml): training-budget overrides (`train`), `seeds`, and the learning-rate
    grid (`lr_grid`, `pilot_steps`: lora_efficiency.lr_tuning); each wins over the sweep file's."""
    if not profile:
        return {}
    path = CONFIG_DIR / "profiles" / f"{profile}.yaml"
    if not re.fullmatch(r"\w[\w.-]*", profile) or not is_path(path, "file"):  # a name, never a path elsewhere
        known = sorted(p.stem for p in (CONFIG_DIR / "profiles").glob("*.yaml"))
        raise UserError(f"profile={profile!r} is invalid: one of {', '.join(known)} or empty")
    return read_mapping(path, "profile")


MAX_NAME = 100  # the sweep's run is `sweep-<name>`; MLflow takes run names of up to 250 characters


def is_sweep_name(name: object) -> bool:
    """A string of 1 to MAX_NAME characters with nothing printable() would escape: a list was stored as a 34 MB
    run name, and ESC sequences or a newline in a name reached the terminal raw."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and printable(name) == name


def check_size(path: Path, spec: dict, runs: int) -> None:
    """A sweep above MAX_RUNS_UNASKED runs needs `max_runs` >= its size in its file; any sweep stays within its own."""
    stated = spec.get("max_runs")
    if stated is not None and (isinstance(stated, bool) or not isinstance(stated, int) or stated < 1):
        raise ConfigError([invalid("max_runs", stated, "an integer >= 1, the most runs this sweep may start")])
    if runs > (stated or MAX_RUNS_UNASKED):
        allowed = f"max_runs={stated}" if stated else f"more than {MAX_RUNS_UNASKED} runs"
        raise ConfigError(
            [
                f"config={str(path)!r} expands to {runs:,} runs (configurations x seeds), {allowed}: "
                f"set max_runs: {runs} in the file if that is meant, or shorten the axes"
            ]
        )


def load_sweep(path: str | Path, *, profile: str = "", overrides: dict[str, Any] | None = None) -> Sweep:
    """Expand a sweep file into children and check every one of them before anything runs."""
    path = Path(path)
    spec = read_mapping(path, "config")
    problems = [
        f"config={str(path)!r}: unknown key {shown(k)}: allowed are {', '.join(sorted(SWEEP_KEYS))}"
        for k in spec
        if k not in SWEEP_KEYS
    ]
    if ("axes" in spec) == ("configurations" in spec):
        problems.append(
            f"config={str(path)!r}: give either axes (a grid) or configurations (a list), not both or neither"
        )
    if "name" in spec and not is_sweep_name(spec["name"]):
        problems.append(invalid("name", spec["name"], f"a name of 1 to {MAX_NAME} printable characters (a run name)"))
    if problems:
        raise ConfigError(problems)
    prof = load_profile(profile)
    for where, part in (("base", spec.get("base")), (f"profile={profile!r}: train", prof.get("train"))):
        if part is not None and not isinstance(part, dict):  # `{**part}` of a list was a TypeError line
            raise ConfigError([invalid(where, part, "a mapping of setting -> value")])
    grid = lr_settings(spec, prof)  # checked before the configurations: a bad grid is one line
    base = {**read_defaults("train"), **(spec.get("base") or {}), **(prof.get("train") or {}), **(overrides or {})}
    seeds = prof.get("seeds", spec.get("seeds", [base["seed"]]))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError([invalid("seeds", seeds, "a non-empty list of integers >= 0")])
    if "axes" in spec:
        axes = spec["axes"]
        if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
            raise ConfigError([invalid("axes", axes, "a mapping of setting -> non-empty list of values")])
        check_size(path, spec, math.prod(len(v) for v in axes.values()) * len(seeds))  # before the product exists
        variants = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    else:
        variants = spec["configurations"]
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants) or not variants:
            raise ConfigError([invalid("configurations", variants, "a non-empty list of mappings")])
        check_size(path, spec, len(variants) * len(seeds))
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
    if grid is not None and grid.pilot_seed in seeds:
        problems.append(
            invalid(
                "pilot_seed",
                grid.pilot_seed,
                f"a seed outside the main seeds {seeds}: a pilot at a main seed is "
                "that seed's main run, so its rate would be chosen on a run it is scored by",
            )
        )
    if grid is not None and not problems:
        problems = check_grid_fits(
            grid, [(c.label, c.config, c.overrides) for c in children if c.config.seed == seeds[0]]
        )
    if problems:
        raise ConfigError(sorted(set(problems)))
    children, aliases = one_per_resolved_modules(children)
    return Sweep(spec.get("name", path.stem), str(path), children, seeds, grid, aliases)


def one_per_resolved_modules(children: list[Child]) -> tuple[list[Child], dict[str, list[str]]]:
    """Children that differ only in the name of their target_modules and adapt the same modules (on Llama-style
    models attention_mlp and all_linear both name q, k, v, o, gate, up and down; full fine-tuning trains every
    weight whatever it names) train once, under the preferred name (models.preferred_name: all_linear first). What
    each name adapts is read from the model's config on the meta device, no weights loaded; a model whose config
    cannot be read here (a hub id offline) is left as it is. The children kept are unchanged, so their sweep_key and
    config_hash are those of the same child before this existed.

    Returns:
        The children kept (in file order) and, for each name trained in place of others, those others.
    """
    names = defaultdict(set)  # (model, trust_remote_code) -> target_modules values of its LoRA children
    for c in children:
        if c.config.method == "lora":
            names[c.config.model, c.config.trust_remote_code].add(c.config.target_modules)
    resolved: dict[tuple[str, bool, str], tuple[str, ...]] = {}
    for (model, trust), specs in names.items():
        if len(specs) < 2:
            continue
        from lora_efficiency.models import resolve_model, target_modules_from_config

        try:
            found = target_modules_from_config(resolve_model(model).path, specs, trust_remote_code=trust)
        except Exception:  # noqa: BLE001 - advisory: without the config, every name trains as before
            continue
        resolved |= {(model, trust, spec): modules for spec, modules in found.items()}

    def adapts(c: Child) -> tuple[str, ...] | None:
        if c.config.method != "lora":
            return ("every weight",)
        return resolved.get((c.config.model, c.config.trust_remote_code, c.config.target_modules))

    groups: dict[str, list[Child]] = defaultdict(list)
    for c in children:
        if (modules := adapts(c)) is not None:
            rest = {k: v for k, v in c.config.flat().items() if k != "target_modules"}
            groups[json.dumps([rest, modules], sort_keys=True, default=str)].append(c)
    dropped, aliases = set(), defaultdict(set)
    for group in groups.values():
        kept = preferred_name({c.config.target_modules for c in group})
        keeper = next(c for c in group if c.config.target_modules == kept)
        for c in group:
            if c is not keeper:
                dropped.add(id(c))
                if c.config.target_modules != kept:
                    aliases[kept].add(c.config.target_modules)
    kept_children = [c for c in children if id(c) not in dropped]
    return kept_children, {name: sorted(also) for name, also in aliases.items()}


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
    pilots: int = 0  # of total: learning-rate pilots (lora_efficiency.lr_tuning)
    pilots_failed: int = 0  # pilots that failed or diverged: not in `failed` (left out of the choice, no more)
    failed_pilot_runs: dict[str, str] = field(default_factory=dict)  # sweep_key -> run id (or "") of a failed pilot

    def tags(self) -> dict[str, str]:
        """The counts a sweep's parent run is tagged with (by `sweep` and by every sweep of the study)."""
        tags = {
            "children_total": str(self.total),
            "children_finished": str(self.finished),
            "children_skipped": str(self.skipped),
            "children_failed": str(self.failed),
        }
        if self.pilots:
            tags |= {"children_pilots": str(self.pilots), "children_pilots_failed": str(self.pilots_failed)}
        return tags


def predicted_peaks(sweep: Sweep, data_path: str) -> dict[str, float | None]:
    """The memory planner's peak for every child (by name), before any runs: None where it cannot tell."""
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
            **planner_inputs(c.flat()),
        )
    return out


def finished_keys(client, experiment_id: str) -> dict[str, str]:
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000)
    return {r.data.tags["sweep_key"]: r.info.run_id for r in runs if "sweep_key" in r.data.tags}


def parent_tags(sweep: Sweep, *, profile: str, data_fingerprint: str, backend: str) -> dict[str, str]:
    """The tags of a sweep's parent run, whether `sweep` or the study (`main`) opened it."""
    tags = {
        "sweep_name": sweep.name,
        "sweep_file": sweep.path,
        "sweep_axes": sweep.axes,
        "profile": profile,
        "data_fingerprint": data_fingerprint,
        "sweep_backend": backend,
    }
    if sweep.aliases:  # the report names each such configuration with every name that resolved to it
        tags[ALIASES_TAG] = json.dumps(sweep.aliases, sort_keys=True)
    return tags


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
    warm_children: bool = True,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run every child not already FINISHED, each in its own process, as a child run of `parent_run_id`.

    A process per child keeps memory figures honest: in one long process the heap a bf16 child leaves behind
    raises the next child's measured peak RSS. Starting one costs ~7 s of imports on a 2-core CPU, so the local
    backend forks each child from a server that imported them once (`warm_children`, lora_efficiency.forkserver).
    A child that fails (an exception, an out-of-memory kill) is marked FAILED with its error and the sweep goes on.
    A child the memory planner predicts will not fit the device's available memory is announced with a warning,
    then tried.

    backend "local" runs the children one after another here; "ray" runs them as Ray tasks, concurrently as far
    as `cpus_per_trial`/`gpus_per_trial` and `max_concurrent` (0: no cap) allow, on a local Ray instance
    (`ray_address` empty) or the cluster at `ray_address`; lora_efficiency.ray_backend says what travels.
    On a terminal (local backend): a bar for the sweep and one per child for its steps; elsewhere, plain lines.

    With a learning-rate grid (sweep.lr_grid) the backend is called twice: every pilot first (lora_efficiency.lr_tuning
    chooses each configuration's learning rate from them), then every main run at its configuration's choice.
    """
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    shown = _Progress(sweep, bars=progress.bars_wanted() and backend == "local", log=log)  # concurrent: lines
    stale = fail_orphaned_runs(client, experiment_id, by=f" by sweep run {parent_run_id}")
    if stale:
        shown.say(f"[{sweep.name}] marked {stale} RUNNING run(s) whose process is gone FAILED")
    place = _Placement(parent_run_id, experiment_id, backend, _children_env(bars=shown.bar is not None))
    phase = _Phase(
        sweep=sweep,
        client=client,
        fingerprint=data_fingerprint,
        data_path=data_path,
        data=sweep.children[0].config.data if backend == "ray" and ray_address else data_path,  # a cluster: its own
        place=place,
        shown=shown,
        done=finished_keys(client, experiment_id),
        runs=_backend(backend, ray_address, max_concurrent, cpus_per_trial, gpus_per_trial, warm_children, shown.say),
    )
    choices = _run_pilots(phase) if sweep.lr_grid is not None else {}
    _run_main(phase, choices)
    shown.close()
    return shown.result


@dataclass
class _Phase:
    """What both phases of one sweep (the pilots, then the main runs) share."""

    sweep: Sweep
    client: Any
    fingerprint: str
    data_path: str  # the prepared folder here (the memory planner reads it)
    data: str  # what the children train on: data_path, or the data reference a cluster's node resolves
    place: _Placement
    shown: _Progress
    done: dict[str, str]  # sweep_key -> FINISHED run id, when the sweep started
    runs: Callable[[list[Job]], Iterable[tuple[Job, Outcome]]]
    revisions: dict[str, str] = field(default_factory=dict)  # model setting -> local folder's content revision

    def revision(self, config: TrainConfig) -> str:
        """The content revision of the child's model when it is a local folder here (else ''), once per sweep."""
        if config.model not in self.revisions:
            self.revisions[config.model] = local_revision(config.model)
        return self.revisions[config.model]

    def submit(self, todo: list[tuple[Child, str, dict[str, str]]], *, pilot: bool = False) -> dict[str, str | None]:
        """Run (child, sweep_key, tags) whose key is not FINISHED yet, each announced first if predicted not to fit;
        returns each run's key -> None (FINISHED) or its error; keys already FINISHED are counted as skipped."""
        for child, key, _ in todo:
            if key in self.done:
                self.shown.skipped(child.name, key, self.done[key])
        todo = [t for t in todo if t[1] not in self.done]
        children = [child for child, _, _ in todo]
        seeds = self.sweep.seeds
        predicted = (
            predicted_peaks(Sweep(self.sweep.name, self.sweep.path, children, seeds), self.data_path) if todo else {}
        )
        jobs = []
        for child, key, tags in todo:
            _warn_if_too_big(child, predicted.get(child.name), self.shown.say, self.sweep.name)
            jobs.append(_job(self.sweep.name, child, key, self.data, self.place, tags))
        return {
            job.key: _record(self.client, job, outcome, self.shown, pilot=pilot) for job, outcome in self.runs(jobs)
        }


def _run_pilots(phase: _Phase) -> dict[str, Choice | NoLearningRate]:
    """Phase 1: one pilot per learning rate of each configuration (at pilot_seed, else its first seed), then the
    choice per configuration (by lr_group): a Choice, or the NoLearningRate of a configuration whose every pilot
    failed. With `lr_grid_extend` a configuration whose best rate is the highest or lowest it tried gets one more
    pilot past that edge (`beyond_edge`), up to that many times, until its choice lies inside what it tried."""
    grid = phase.sweep.lr_grid
    planned: dict[str, tuple[Child, list[tuple[float, str]]]] = {}  # lr_group -> (child, [(lr, pilot key)])
    todo = []
    for child in phase.sweep.first_seed_children():
        group = group_id(child.config, phase.fingerprint, phase.revision(child.config))
        if group in planned:  # the same configuration twice in the file: tuned once
            continue
        planned[group] = (child, [])
        todo += [_pilot(phase, planned[group], group, lr) for lr in grid.for_method(child.config.method)]
    errors = phase.submit(todo, pilot=True)
    choices = {group: _choose(phase, child.label, pilots, errors) for group, (child, pilots) in planned.items()}
    for _ in range(grid.extend):
        todo = []
        for group, choice in choices.items():
            lr = beyond_edge(choice) if isinstance(choice, Choice) else None
            if lr is not None:
                phase.shown.say(
                    f"[{phase.sweep.name}] [{planned[group][0].label}] lr={fmt_lr(choice.lr)} is the edge of what "
                    f"was tried: one more pilot at lr={fmt_lr(lr)}"
                )
                todo.append(_pilot(phase, planned[group], group, lr))
        if not todo:
            break
        phase.shown.add_pilots(len(todo))
        errors |= phase.submit(todo, pilot=True)
        for _, _, tags in todo:
            child, pilots = planned[tags[GROUP]]
            choices[tags[GROUP]] = _choose(phase, child.label, pilots, errors)
    return choices


def _pilot(
    phase: _Phase, planned: tuple[Child, list[tuple[float, str]]], group: str, lr: float
) -> tuple[Child, str, dict[str, str]]:
    """One pilot of a configuration at `lr` (child, key, tags), recorded in its planned pilots."""
    child, pilots = planned
    grid = phase.sweep.lr_grid
    config = pilot_config(child.config, lr, grid.steps(child.config), grid.pilot_seed)
    key = pilot_key(config, phase.fingerprint, phase.revision(config))
    pilots.append((lr, key))
    return Child(f"{child.label},lr={fmt_lr(lr)},pilot", config, child.overrides), key, pilot_tags(group, child.label)


def _choose(
    phase: _Phase, label: str, pilots: list[tuple[float, str]], errors: dict[str, str | None]
) -> Choice | NoLearningRate:
    """One configuration's learning rate from its pilots' runs (those of this sweep, or FINISHED before it)."""
    results = []
    for lr, key in pilots:
        run_id = phase.shown.result.runs.get(key) or phase.shown.result.failed_pilot_runs.get(key, "")
        run = phase.client.get_run(run_id) if run_id else None
        status = run.info.status if run is not None and errors.get(key) is None else "FAILED"
        metrics = dict(run.data.metrics) if run is not None else {}
        results.append(PilotResult(lr, run_id, status, metrics, errors.get(key) or ""))
    name = phase.sweep.name
    try:
        choice = choose_lr(results, label=label)
    except NoLearningRate as exc:
        phase.shown.say(f"[{name}] {exc}")
        return exc
    left_out = f"; left out: {'; '.join(choice.excluded)}" if choice.excluded else ""
    phase.shown.say(
        f"[{name}] [{label}] lr={fmt_lr(choice.lr)} chosen from {','.join(map(fmt_lr, choice.grid))} by "
        f"{choice.metric}={choice.value:.4f}{left_out}"
    )
    return choice


def seed_by_seed(children: list[Child], seeds: list[int]) -> list[Child]:
    """The children in the order they run: the first seed of every configuration, then the second seed of every
    one, ... (configurations in file order within a seed). The machine drifts over a study (its bf16 matmul ran
    871 GFLOP/s before the 2026-12-03 standard study's QLoRA re-runs and 727 after): run configuration by
    configuration, a slow half hour lands on one configuration's seeds and reads as its effect; seed by seed, it
    lands on one seed of each, which the paired comparison by seed cancels."""
    order = {seed: i for i, seed in enumerate(seeds)}
    return sorted(children, key=lambda c: order.get(c.config.seed, len(order)))  # stable: file order within a seed


def _run_main(phase: _Phase, choices: dict[str, Choice | NoLearningRate]) -> None:
    """Phase 2: every (configuration, seed) at its configuration's learning rate, seed by seed (seed_by_seed); a
    configuration without one (every pilot failed) fails its main runs without starting them."""
    todo = []
    for child in seed_by_seed(phase.sweep.children, phase.sweep.seeds):
        group = group_id(child.config, phase.fingerprint, phase.revision(child.config))
        choice = choices.get(group)
        if isinstance(choice, NoLearningRate):
            phase.shown.not_run(child.name, str(choice))
            continue
        config = child.config.replace(lr=choice.lr) if choice is not None else child.config
        main = Child(child.name, config, child.overrides)
        key = sweep_key(config, phase.fingerprint, phase.revision(config))
        todo.append((main, key, main_tags(group, child.label, choice)))
    phase.submit(todo)


class _Progress:
    """What a sweep shows and counts as its children end: a bar on a terminal (else plain lines through `log`),
    the ETA, and the SweepResult."""

    def __init__(self, sweep: Sweep, *, bars: bool, log: Callable[[str], None]):
        self.name, total = sweep.name, len(sweep.children) + sweep.pilots
        self.bar = progress.bar(total=total, desc=f"sweep {sweep.name}", unit="run", position=0) if bars else None
        show = self.bar.write if self.bar is not None else log
        self.say = lambda line: show(printable(line))  # labels hold values from the sweep file, file names included
        self.result, self.eta = SweepResult(total, pilots=sweep.pilots), Eta(total)

    def add_pilots(self, n: int) -> None:
        """Pilots added past a grid's edge: counted in the totals (and the bar) once they are known."""
        self.result.total += n
        self.result.pilots += n
        self.eta.total += n
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def skipped(self, child_name: str, key: str, run_id: str, why: str = "already FINISHED") -> None:
        self.result.skipped += 1
        self.result.runs[key] = run_id
        self.eta.update(None)
        self.say(f"{self.eta.line(self.name)}: {child_name} {why} ({run_id}), skipped")
        if self.bar is not None:
            self.bar.update(1)

    def ended(self, job: Job, outcome: Outcome, error: str | None, *, pilot: bool = False) -> None:
        """`error` None: the child FINISHED."""
        self.eta.update(outcome.seconds)
        if error is None:
            self.say(f"{self.eta.line(self.name)}: {job.name} FINISHED in {outcome.seconds:.0f} s")
        else:
            left_out = " (left out of the learning-rate choice)" if pilot else ""
            self.say(f"{self.eta.line(self.name)}: {job.name} FAILED{left_out}: {error}")
        if self.bar is not None:
            self.bar.set_postfix_str(self.eta.eta(), refresh=False)
            self.bar.update(1)

    def not_run(self, child_name: str, error: str) -> None:
        """A child that fails without starting (its configuration has no learning rate)."""
        self.result.failed += 1
        self.result.failures.append(f"{child_name}: {error}")
        self.eta.update(None)
        self.say(f"{self.eta.line(self.name)}: {child_name} FAILED (not started): {error}")
        if self.bar is not None:
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
    return {
        "MLFLOW_TRACKING_URI": absolute_tracking_uri(mlflow.get_tracking_uri()),
        "MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING"),  # not 5 INFO lines a child
        progress.PROGRESS_ENV: "bar" if bars else "lines",
        progress.BAR_POSITION_ENV: "1",
    }


def _warn_if_too_big(child: Child, need_mb: float | None, say: Callable[[str], None], sweep_name: str) -> None:
    have_mb = planner.available_mb(resolve_device(child.config.device))
    if need_mb is not None and need_mb > have_mb:
        say(
            f"[{sweep_name}] warning: {child.name} is predicted to need {need_mb:,.0f} MB, the device has "
            f"{have_mb:,.0f} MB available: it may run out of memory (trying it anyway)"
        )


def _job(sweep_name: str, child: Child, key: str, data: str, place: _Placement, extra: dict[str, str]) -> Job:
    tags = {
        **extra,
        "mlflow.parentRunId": place.parent_run_id,
        "sweep_name": sweep_name,
        "sweep_key": key,
        "sweep_configuration": child.name,
        "seed": str(child.config.seed),
        "sweep_backend": place.backend,
    }
    settings = settings_text(child.config.replace(data=data), note=f"sweep {sweep_name}, child {child.name}")
    return Job(child.name, key, place.experiment_id, tags, settings, place.env, child.config.num_processes)


def _backend(
    backend: str,
    ray_address: str,
    max_concurrent: int,
    cpus_per_trial: float,
    gpus_per_trial: str,
    warm_children: bool,
    say: Callable[[str], None],
) -> Callable[[list[Job]], Iterable[tuple[Job, Outcome]]]:
    """What runs the jobs and yields (job, outcome) as each one ends: children.run_here, or Ray tasks."""
    if backend != "ray":
        return functools.partial(run_here, warm=warm_children)
    # imported only for backend ray: importing ray_backend sets RAY_DEDUP_LOGS, which local children need not see

    return functools.partial(
        run_jobs,
        address=ray_address,
        max_concurrent=max_concurrent,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        say=say,
    )


def _record(client, job: Job, outcome: Outcome, shown: _Progress, *, pilot: bool = False) -> str | None:
    """Count a child that ended; a failed one's run gets its error tag and is marked FAILED if still RUNNING.
    A failed pilot is counted apart (pilots_failed): it is left out of the choice, and fails the sweep only when
    its configuration is left without a learning rate. A child another sweep claimed first (children.claim)
    is skipped: that sweep trains it. Returns None (FINISHED, or trained by the other sweep) or the child's error."""
    if outcome.claimed_by:
        shown.skipped(job.name, job.key, outcome.claimed_by, why="is trained by another sweep's run")
        return None
    status = client.get_run(outcome.run_id).info.status if outcome.run_id else "NONE"
    result = shown.result
    if outcome.returncode == 0 and status == "FINISHED":
        result.finished += 1
        result.runs[job.key] = outcome.run_id
        shown.ended(job, outcome, None)
        return None
    error = _child_error(outcome)
    if outcome.run_id:
        client.set_tag(outcome.run_id, "error", error[:5000] or f"exit status {outcome.returncode}")
        if client.get_run(outcome.run_id).info.status == "RUNNING":
            client.set_terminated(outcome.run_id, "FAILED")
    if pilot:
        result.pilots_failed += 1
        result.failed_pilot_runs[job.key] = outcome.run_id
    else:
        result.failed += 1
        result.failures.append(f"{job.name}: {error}")
    shown.ended(job, outcome, error, pilot=pilot)
    return error or f"exit status {outcome.returncode}"


def _child_error(outcome: Outcome) -> str:
    """The child's `error:` line (run_cli's one-line error), else its last line of stderr; a signal is named."""
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
    if outcome.returncode < 0:
        error = f"killed by signal {-outcome.returncode} (out of memory?) {error}".strip()
    return redact(error)  # a child's last line may be anything it printed: a URI with its password, a token


def absolute_tracking_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` (relative to the working folder) as an absolute URI, so a child started anywhere
    (a Ray worker's folder) writes to the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri
