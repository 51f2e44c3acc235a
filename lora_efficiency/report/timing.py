"""The report's section "Where the time goes": each configuration's wall clock split into the phases its runs
logged, so the share spent training is read from the runs, not from a script.

A train run's MLflow wall clock (end_time - start_time) covers: setup (data, model, optimizer; time/setup_s),
training (time/train_s), validation (time/validation_s), forgetting (the base's score before the first step, 0 when
cached, and the trained model's after; time/forgetting_s), evaluation (held-out loss, exact match, generation speed;
time/evaluation_s), logging (saving and logging the adapter, tables and metrics: time/logging_s, and the MLflow
model: time/model_logging_s), and what no metric covers (closing the run, the gaps between phases): "other". What
happens before the run opens (imports, resolving the model) is in time/startup_s, not in the wall clock.
"""

from __future__ import annotations

from lora_efficiency.report.findings import Configuration, Report

TITLE = "Where the time goes"
# (column, the metrics summed into it)
PHASES = (
    ("setup", ("time/setup_s",)),
    ("training", ("time/train_s",)),
    ("validation", ("time/validation_s",)),
    ("forgetting", ("time/forgetting_s",)),
    ("evaluation", ("time/evaluation_s",)),
    ("logging", ("time/logging_s", "time/model_logging_s")),
)


def run_split(run) -> dict[str, float] | None:
    """One run's seconds by phase, with `wall` (its MLflow wall clock) and `other` (wall minus the phases); None
    for a run with no end time or no time/train_s (still running, or logged before these metrics)."""
    if not run.end_ms or "time/train_s" not in run.metrics:
        return None
    split = {name: sum(run.metrics.get(m, 0.0) for m in metrics) for name, metrics in PHASES}
    wall = (run.end_ms - run.start_ms) / 1000
    return {"wall": wall, **split, "other": wall - sum(split.values())}


def configuration_split(config: Configuration) -> tuple[dict[str, float], int] | None:
    """The mean split over a configuration's runs that have one, and how many had."""
    splits = [s for s in map(run_split, config.runs) if s]
    if not splits:
        return None
    return {k: sum(s[k] for s in splits) / len(splits) for k in splits[0]}, len(splits)


def time_split_section(report: Report) -> list[tuple]:
    """The section as render.py's blocks: what the columns are, then one row per configuration."""
    header = ["configuration", "runs", "wall clock (s)", *(f"{name} (s)" for name, _ in PHASES)]
    header += ["other (s)", "training share"]
    rows = []
    for config in report.configurations:
        found = configuration_split(config)
        if not found:
            continue
        split, n = found
        rows.append(
            [config.label, str(n), f"{split['wall']:.1f}"]
            + [f"{split[name]:.1f}" for name, _ in PHASES]
            + [f"{split['other']:.1f}", f"{split['training'] / split['wall']:.0%}" if split["wall"] else "-"]
        )
    if not rows:
        return []
    intro = (
        "Mean seconds per run of each phase, from the runs' time/* metrics; the wall clock is the MLflow run's "
        "(end - start). setup: data, model, optimizer; forgetting: the base's score before the first step (0 when "
        "read from the cache) and the trained model's after; evaluation: held-out loss, exact match, generation "
        "speed; logging: the adapter, tables, metrics and the MLflow model; other: closing the run and what no "
        "metric covers. Runs logged before a phase had its metric count it in other."
    )
    return [("h2", TITLE), ("p", intro), ("table", header, rows)]
