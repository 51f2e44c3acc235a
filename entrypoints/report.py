"""The study's report from the runs API: tables over seeds, findings against the noise, charts, recommendations.

mlflow run . -e report --env-manager local --experiment-name study-quick    # the report run lands beside the runs
mlflow run . -e report --env-manager local -P sweep_run_id=<a sweep or study run's id>
python -m entrypoints.report --experiment study-quick --output reports/quick

Writes report.md, report.html (images inside), configurations.csv and charts/ to the output folder and logs
them as the artifacts of a run tagged report=true; registers the winners (the best configuration overall and under
each memory budget) as versions of the registered model <experiment>, aliases best and best-under-<N>mb.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_efficiency.cli import run_cli
from lora_efficiency.config import ReportConfig, parse_args, read_defaults, report_folder
from lora_efficiency.errors import printable


def main(argv: list[str]) -> None:
    cfg = parse_args(ReportConfig, "report", argv, description=__doc__)
    # lazy: after parsing: bad input exits in ~0.3 s, before torch, transformers and MLflow load (~6 s)
    import mlflow

    from lora_efficiency.report import build_report, fetch_loss_curves, fetch_scope, predict_peak_memory, write_report
    from lora_efficiency.report.lr import pilots_in_scope
    from lora_efficiency.report.registry import register_winners
    from lora_efficiency.report.runs import declared_contrasts, fetch_per_example_losses
    from lora_efficiency.tracking import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, check_tracking_store, start_run

    check_tracking_store()
    client = mlflow.MlflowClient()
    experiment = (
        cfg.experiment or _experiment_of_this_run(client) or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    )
    scope = fetch_scope(client, experiment=experiment, sweep_run_id=cfg.sweep_run_id)  # nothing to report: error
    memory_points, memory_notes = predict_peak_memory(scope.runs)
    report = build_report(
        scope,
        defaults=read_defaults("train"),
        margin=cfg.margin,
        alpha=cfg.alpha,
        budgets_mb=[float(b) for b in cfg.budgets_mb.split(",")] if cfg.budgets_mb else None,
        loss_curves=fetch_loss_curves(client, scope.runs + pilots_in_scope(scope)),  # pilots': report/lr.py
        memory_points=memory_points,
        memory_notes=memory_notes,
        val_curves=fetch_loss_curves(client, scope.runs, "val/loss"),
        contrasts=declared_contrasts(scope),
        per_example=fetch_per_example_losses(client, scope.runs),
    )
    folder = Path(cfg.output) if cfg.output else report_folder(experiment)
    paths = write_report(report, folder)  # a new or empty folder, or an earlier report's: nothing else is touched

    with start_run(
        run_name=f"report-{experiment}",
        entry_point="report",
        system_metrics=False,
        experiment=experiment,
        description=f"The report on experiment {experiment}: findings, charts and recommendations in {folder}",
    ) as tracker:
        tracker.log_params({**vars(cfg), "experiment_resolved": experiment, "output_resolved": str(folder)})
        tracker.set_tags(
            {
                "report": "true",
                "report_experiment": experiment,
                "report_scope_run_id": scope.root.run_id if scope.root else "",
                "report_runs": len(scope.runs),
                "report_configurations": len(report.configurations),
            }
        )
        tracker.log_files(folder, list(paths.values()))  # what this report wrote, by name
        report_run_id = tracker.run_id
        registered = register_winners(
            client,
            name=experiment,
            experiment_id=client.get_experiment_by_name(experiment).experiment_id,
            configs=report.configurations,
            budgets_mb=[r.budget_mb for r in report.recommendations],
            report_run_id=report_run_id,
        )
        tracker.set_tags({"registered_model": experiment, "registered_aliases": len(registered)})
    for r in registered:
        print(printable(f"models:/{experiment}@{r.alias} -> version {r.version}: {r.label} (run {r.run_id})"))
    print(
        printable(
            f"report of {experiment}: {len(report.configurations)} configurations, {len(scope.runs)} runs, "
            f"{len(report.findings)} findings -> {paths['markdown']}, {paths['html']} (run {report_run_id})"
        )
    )


def _experiment_of_this_run(client) -> str:
    """The experiment `mlflow run --experiment-name X` filed this report run in; not the Default one it takes
    when none is named."""
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "")
    if "MLFLOW_RUN_ID" not in os.environ or experiment_id in ("", "0"):
        return ""
    return client.get_experiment(experiment_id).name


if __name__ == "__main__":
    run_cli(main)
