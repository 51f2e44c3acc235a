"""The whole study: prepare the data, evaluate the base model alone, run the rank, module and quantization sweeps,
then write the report (reports/<experiment>/report.md, .html and charts; also a run tagged report=true).

    make study                                                   # = the line below
    mlflow run . -e main --env-manager local -P profile=quick
    mlflow run . -e main --env-manager local -P profile=full     # on a GPU
Started again after an interruption, it runs only what is missing (finished runs are found by their keys).
"""

from __future__ import annotations

import os
import subprocess
import sys

from lora_efficiency.cli import run_cli
from lora_efficiency.config import StudyConfig, parse_args
from lora_efficiency.errors import UserError


def main(argv: list[str]) -> None:
    cfg = parse_args(StudyConfig, "main", argv, description=__doc__)
    import mlflow
    from transformers.utils import logging as hf_logging

    from lora_efficiency.models import load_tokenizer, resolve_model
    from lora_efficiency.prepare import resolve_data
    from lora_efficiency.sweep import load_sweep, owner_tags, run_sweep
    from lora_efficiency.tracking import start_run

    hf_logging.disable_progress_bar()
    overrides = {"data": cfg.data} if cfg.data else {}
    sweeps = [load_sweep(path.strip(), profile=cfg.profile, overrides=overrides) for path in cfg.sweeps.split(",")]
    first = sweeps[0].children[0].config  # every file and every child checked above, before anything runs
    source = resolve_model(first.model)
    prepared = resolve_data(first.data, model=source, tokenizer=load_tokenizer(source), seq_len=first.seq_len)
    fingerprint = prepared.manifest["fingerprint"]
    total = sum(len(s.children) for s in sweeps)
    print(
        f"[study {cfg.profile}] {len(sweeps)} sweeps, {total} runs (repeats across sweeps run once); "
        f"data {prepared.manifest['dataset']}",
        flush=True,
    )
    failed = []
    with start_run(run_name=f"study-{cfg.profile or 'default'}", entry_point="main", system_metrics=False) as tracker:
        tracker.log_params(vars(cfg))
        tracker.set_tags({"study_profile": cfg.profile, "data_fingerprint": fingerprint})
        client = mlflow.MlflowClient()
        experiment_id = client.get_run(tracker.run_id).info.experiment_id
        for quantization in cfg.baselines.split(","):
            _baseline(
                client,
                experiment_id,
                tracker.run_id,
                first,
                quantization.strip(),
                str(prepared.path),
                fingerprint,
                owner_tags(),
            )
        for sweep in sweeps:
            parent = client.create_run(
                experiment_id,
                run_name=f"sweep-{sweep.name}",
                tags={
                    "mlflow.parentRunId": tracker.run_id,
                    "entry_point": "sweep",
                    "sweep_name": sweep.name,
                    "sweep_file": sweep.path,
                    "profile": cfg.profile,
                    "data_fingerprint": fingerprint,
                    **owner_tags(),
                },
            )
            result = run_sweep(
                sweep,
                parent_run_id=parent.info.run_id,
                data_fingerprint=fingerprint,
                data_path=str(prepared.path),
                log=lambda line: print(line, flush=True),
            )
            for key, value in {
                "children_total": result.total,
                "children_finished": result.finished,
                "children_skipped": result.skipped,
                "children_failed": result.failed,
            }.items():
                client.set_tag(parent.info.run_id, key, str(value))
            client.set_terminated(parent.info.run_id, "FINISHED" if not result.failed else "FAILED")
            failed += result.failures
        tracker.set_tags({"runs_failed": len(failed)})
        study_run_id, experiment = tracker.run_id, client.get_experiment(experiment_id).name
    # The report reads what the study logged through the runs API, like any later `-e report` would; its own
    # run is a separate run of the experiment (tagged report=true), so the environment's run id must not leak.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    report = [sys.executable, "-m", "entrypoints.report", "--experiment", experiment, "--sweep_run_id", study_run_id]
    report += ["--output", cfg.output] if cfg.output else []
    reported = subprocess.run(report, env=env).returncode == 0
    if failed:
        raise UserError(f"{len(failed)} run(s) of the study failed: " + " | ".join(failed)[:2000])
    if not reported:
        raise UserError(f"the study's runs are logged, but its report failed: run {' '.join(report[1:])} again")
    folder = cfg.output or f"reports/{experiment}"
    print(f"[study {cfg.profile}] done: {folder}/report.md; compare the runs with `make ui`")


def _baseline(client, experiment_id, study_run_id, config, quantization, data_path, fingerprint, owner) -> None:
    """The base model without adapter, evaluated like every run: once per data and settings."""
    key = f"baseline:{config.model}:{quantization}:{fingerprint}:{config.eval_samples}:{config.generate_samples}"
    done = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'FINISHED' and tags.baseline = 'true'"
    )
    if any(r.data.tags.get("baseline_key") == key for r in done):
        print(f"[baseline {quantization}] already evaluated, skipped", flush=True)
        return
    run = client.create_run(
        experiment_id,
        run_name=f"baseline-{quantization}",
        tags={"mlflow.parentRunId": study_run_id, "baseline_key": key, **owner},
    )
    cmd = [
        sys.executable,
        "-m",
        "entrypoints.evaluate",
        "--adapter",
        "none",
        "--model",
        config.model,
        "--data",
        data_path,
        "--quantization",
        quantization,
        "--seq_len",
        str(config.seq_len),
        "--eval_samples",
        str(config.eval_samples),
        "--generate_samples",
        str(config.generate_samples),
        "--max_new_tokens",
        str(config.max_new_tokens),
        "--device",
        config.device,
    ]
    proc = subprocess.run(cmd, env={**os.environ, "MLFLOW_RUN_ID": run.info.run_id})
    if proc.returncode != 0 and client.get_run(run.info.run_id).info.status == "RUNNING":
        client.set_terminated(run.info.run_id, "FAILED")


if __name__ == "__main__":
    run_cli(main)
