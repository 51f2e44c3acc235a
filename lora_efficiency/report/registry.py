"""The report's winners in the MLflow Model Registry: one registered model named after the experiment, a version
per winning run, aliases that say what it won (`best`, `best-under-3000mb`), tags that link to the runs and the
report run. Then `python -m entrypoints.generate --run_id models:/<experiment>@best` answers with it."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from lora_efficiency.report.findings import PERPLEXITY, Configuration, recommend


@dataclass(frozen=True)
class Registered:
    alias: str
    version: str
    run_id: str
    label: str


def budget_alias(budget_mb: float) -> str:
    return f"best-under-{budget_mb:.0f}mb"


def register_winners(
    client, *, name: str, experiment_id: str, configs: list[Configuration], budgets_mb: list[float], report_run_id: str
) -> list[Registered]:
    """Register the configuration with the lowest mean perplexity under each budget and overall (`best`).

    Only configurations whose runs logged an MLflow model compete (full fine-tuning logs none; runs from before
    models were logged neither); of a configuration, its seed with the lowest perplexity is registered. A run
    registered before keeps its version (a report run twice adds none); `best*` aliases this report does not set
    again are removed, so none points at a winner of an older report."""
    models = {m.source_run_id: m for m in _logged_models(client, experiment_id)}  # one per LoRA run
    candidates = [c for c in configs if PERPLEXITY in c.stats and any(r.run_id in models for r in c.runs)]
    if not candidates:
        return []
    overall = min(candidates, key=lambda c: c.mean(PERPLEXITY))
    winners = [("best", overall)] + [
        (budget_alias(r.budget_mb), r.best) for r in recommend(candidates, budgets_mb) if r.best is not None
    ]
    _ensure_registered_model(client, name, report_run_id)
    done: list[Registered] = []
    for alias, config in winners:
        run = min((r for r in config.runs if r.run_id in models), key=lambda r: r.metrics.get(PERPLEXITY, float("inf")))
        version = _version_of(client, name, run.run_id, models[run.run_id], config, report_run_id)
        client.set_registered_model_alias(name, alias, version)
        done.append(Registered(alias, version, run.run_id, config.label))
    kept = {r.alias for r in done}
    for alias in client.get_registered_model(name).aliases:
        if alias.startswith("best") and alias not in kept:
            client.delete_registered_model_alias(name, alias)
    return done


def _logged_models(client, experiment_id: str) -> list:
    """Every logged model of the experiment, page by page (a page holds 100; a study of 36 runs logs 36)."""
    models, token = [], None
    while True:
        page = client.search_logged_models([experiment_id], page_token=token)
        models += list(page)
        if not (token := page.token):
            return models


def _ensure_registered_model(client, name: str, report_run_id: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description=f"The winners of the lora-efficiency study in experiment {name}, by alias"
        )
    client.set_registered_model_tag(name, "report_run_id", report_run_id)


def _version_of(client, name: str, run_id: str, logged, config: Configuration, report_run_id: str) -> str:
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        version = existing[0].version
    else:
        version = client.create_model_version(
            name, source=f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id
        ).version
    tags = {
        "source_run_id": run_id,
        "config_hash": config.key,
        "configuration": config.label,
        "configuration_runs": ",".join(r.run_id for r in config.runs),
        "mean_perplexity": f"{config.mean(PERPLEXITY):.4f}",
        "report_run_id": report_run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return version
