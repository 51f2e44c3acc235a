"""The whole study (entry point `main`): the data prepared once, the base model evaluated alone (the baselines),
the sweeps as child runs of one study run, then the report. With backend=ray the sweeps' children run as Ray
tasks (sweep.run_sweep's Ray path, the same settings as `sweep`); the baselines run here.

    study = load_study(cfg)                       # every sweep file and child checked, the data prepared
    with start_run(...) as tracker:               # the study run (entrypoints/main.py opens it)
        failures = run_study(study, tracker.run_id)
    report_study(study, tracker.run_id, failures)

Started again after an interruption it runs only what is missing: a baseline is found by its baseline_key tag, a
sweep child by its sweep_key (lora_efficiency.sweep); a configuration in two sweeps trains once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import mlflow

from lora_efficiency.children import flags
from lora_efficiency.config import StudyConfig, TrainConfig, backend_options, is_path, report_folder
from lora_efficiency.configuration import REPORT_SETTINGS
from lora_efficiency.design import Contrast, parse_contrasts, pick
from lora_efficiency.errors import ConfigError, UserError, invalid, printable
from lora_efficiency.prepare import Prepared
from lora_efficiency.subprocesses import child_env
from lora_efficiency.sweep import Sweep, check_one_data, load_profile, load_sweep, parent_tags, prepare_once, run_sweep
from lora_efficiency.tracking import check_tracking_store, owner_tags


def _say(line: str) -> None:
    print(printable(line), flush=True)  # interleaved with the children's output: flushed line by line


@dataclass
class Study:
    config: StudyConfig
    sweeps: list[Sweep]
    prepared: Prepared
    contrasts: list[Contrast] = field(default_factory=list)  # declared in the profile, before any data

    @property
    def first(self) -> TrainConfig:
        """The first child's settings: model and evaluation settings of the baselines."""
        return self.sweeps[0].children[0].config

    @property
    def fingerprint(self) -> str:
        return self.prepared.manifest["fingerprint"]


def profile_sweeps(profile: str) -> str:
    """The sweep files a profile's study runs (its `sweeps`: a comma list), when `main` is given none."""
    listed = load_profile(profile).get("sweeps")
    if not isinstance(listed, str) or not all(is_path(p.strip(), "file") for p in listed.split(",")):
        raise UserError(
            f"profile={profile!r} names no sweep files (sweeps={listed!r}): give main's sweeps=, or a comma list of "
            "sweep files as the profile's `sweeps`"
        )
    return listed


def load_study(cfg: StudyConfig, *, log: Callable[[str], None] = _say) -> Study:
    """Expand and check every sweep file (every child of every sweep, before anything runs), check that they share
    one data set, and prepare it."""
    overrides = {"data": cfg.data} if cfg.data else {}
    paths = cfg.sweeps or profile_sweeps(cfg.profile)
    sweeps = [load_sweep(path.strip(), profile=cfg.profile, overrides=overrides) for path in paths.split(",")]
    check_one_data(sweeps, where=f"sweeps={paths!r}", what="a study")
    contrasts = study_contrasts(cfg.profile, sweeps)
    check_tracking_store()  # bad sweep files never open the store; from here an early exit leaves no run RUNNING
    prepared = prepare_once(sweeps, where=f"sweeps={paths!r}", what="a study")
    total, pilots = sum(len(s.children) for s in sweeps), sum(s.pilots for s in sweeps)
    for sweep in sweeps:
        for line in sweep.alias_lines():
            log(line)
    log(
        f"[study {cfg.profile}] {len(sweeps)} sweeps, {total} runs"
        + (f" + {pilots} learning-rate pilots" if pilots else "")
        + f" (repeats across sweeps run once); data {prepared.manifest['dataset']}"
    )
    return Study(cfg, sweeps, prepared, contrasts)


def study_contrasts(profile: str, sweeps: list[Sweep]) -> list[Contrast]:
    """The profile's declared contrasts, each side checked to name a configuration the sweeps train (its listed
    settings; of several, the one with its other settings at the first sweep's base, the profile's defaults)."""
    where = f"profile={profile!r}"
    contrasts = parse_contrasts(load_profile(profile).get("contrasts"), where=where, settings=REPORT_SETTINGS)
    configs = [c.config.flat() for s in sweeps for c in s.children]
    problems = []
    for i, contrast in enumerate(contrasts):
        for side in ("a", "b"):
            if pick(getattr(contrast, side), configs, configs[0] if configs else {}) is None:
                problems.append(
                    invalid(
                        f"{where}: contrasts[{i}].{side}",
                        getattr(contrast, side),
                        "settings of a configuration the study's sweeps train",
                    )  # fmt: skip
                )
    if problems:
        raise ConfigError(problems)
    return contrasts


def run_study(study: Study, study_run_id: str, *, log: Callable[[str], None] = _say) -> list[str]:
    """The baselines, then every sweep, as child runs of the (open) study run; returns the failed runs' lines."""
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(study_run_id).info.experiment_id
    for quantization in study.config.baselines.split(","):
        _baseline(client, experiment_id, study_run_id, study, quantization.strip(), log)
    failures: list[str] = []
    for sweep in study.sweeps:
        failures += _run_one_sweep(client, experiment_id, study_run_id, study, sweep, log)
    return failures


def _baseline(client, experiment_id: str, study_run_id: str, study: Study, quantization: str, log) -> None:
    """The base model without adapter, evaluated like every run: once per data and settings."""
    config = study.first
    key = f"baseline:{config.model}:{quantization}:{study.fingerprint}:{config.eval_samples}:{config.generate_samples}"
    done = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'FINISHED' and tags.baseline = 'true'"
    )
    if any(r.data.tags.get("baseline_key") == key for r in done):
        log(f"[baseline {quantization}] already evaluated, skipped")
        return
    run = client.create_run(
        experiment_id,
        run_name=f"baseline-{quantization}",
        tags={"mlflow.parentRunId": study_run_id, "baseline_key": key, **owner_tags()},
    )
    settings = {
        "adapter": "none",
        "model": config.model,
        "data": str(study.prepared.path),
        "quantization": quantization,
        "seq_len": config.seq_len,
        "eval_samples": config.eval_samples,
        "generate_samples": config.generate_samples,
        "max_new_tokens": config.max_new_tokens,
        "device": config.device,
    }
    command = [sys.executable, "-m", "entrypoints.evaluate", *flags(settings)]
    proc = subprocess.run(command, env=child_env(MLFLOW_RUN_ID=run.info.run_id))
    if proc.returncode != 0 and client.get_run(run.info.run_id).info.status == "RUNNING":
        client.set_terminated(run.info.run_id, "FAILED")


def _run_one_sweep(client, experiment_id: str, study_run_id: str, study: Study, sweep: Sweep, log) -> list[str]:
    """One sweep under a parent run of its own (tagged as `-e sweep` tags its run), child of the study run."""
    parent = client.create_run(
        experiment_id,
        run_name=f"sweep-{sweep.name}",
        tags={
            "mlflow.parentRunId": study_run_id,
            "entry_point": "sweep",
            **parent_tags(
                sweep, profile=study.config.profile, data_fingerprint=study.fingerprint, backend=study.config.backend
            ),
            **owner_tags(),
        },
    )
    cfg = study.config
    result = run_sweep(
        sweep,
        parent_run_id=parent.info.run_id,
        data_fingerprint=study.fingerprint,
        data_path=str(study.prepared.path),
        **backend_options(cfg),
        log=log,
    )
    for key, value in result.tags().items():
        client.set_tag(parent.info.run_id, key, value)
    client.set_terminated(parent.info.run_id, "FINISHED" if not result.failed else "FAILED")
    return result.failures


def report_study(study: Study, study_run_id: str, failures: list[str]) -> None:
    """Write the report of the (closed) study run, then say what failed: the runs first, else the report."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(client.get_run(study_run_id).info.experiment_id).name
    cfg = study.config
    # The report reads what the study logged through the runs API, like any later `-e report` would; its own
    # run is a separate run of the experiment (tagged report=true), so the environment's run id must not leak.
    env = child_env({k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")})
    report = [sys.executable, "-m", "entrypoints.report", "--experiment", experiment, "--sweep_run_id", study_run_id]
    report += ["--output", cfg.output] if cfg.output else []
    reported = subprocess.run(report, env=env).returncode == 0
    if failures:
        raise UserError(f"{len(failures)} run(s) of the study failed: " + " | ".join(failures)[:2000])
    if not reported:
        raise UserError(f"the study's runs are logged, but its report failed: run {' '.join(report[1:])} again")
    folder = cfg.output or report_folder(experiment)
    print(f"[study {cfg.profile}] done: {printable(folder)}/report.md; compare the runs with `make ui`")
