"""`mlflow run . -e main`: the study's run tree (baseline + sweep parents + children), and a rerun that skips."""

from __future__ import annotations

import uuid

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import mlflow_run, runs_of, tiny_sweep_base

pytestmark = pytest.mark.e2e


def test_study_tree_and_rerun(mlflow_server, tiny_model_dir, tiny_data_file, tmp_path):
    base = tiny_sweep_base(tiny_model_dir, tiny_data_file)
    files = []
    for name, axes in (("ranks", {"rank": [2, 4]}), ("mods", {"target_modules": ["q_v", "attention"]})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "base": {**base, "rank": 4}, "axes": axes, "seeds": [0]}))
        files.append(str(path))
    experiment = f"study-{uuid.uuid4().hex[:8]}"
    params = {"profile": "", "sweeps": ",".join(files), "baselines": "fp32", "output": str(tmp_path / "report")}
    proc = mlflow_run(mlflow_server, experiment, params, entry_point="main")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    runs = runs_of(client, experiment)
    study = next(r for r in runs if r.data.tags.get("entry_point") == "main")
    parents = {r.data.tags["sweep_name"]: r for r in runs if r.data.tags.get("entry_point") == "sweep"}
    assert set(parents) == {"ranks", "mods"}
    assert all(p.data.tags["mlflow.parentRunId"] == study.info.run_id for p in parents.values())
    (baseline,) = [r for r in runs if r.data.tags.get("baseline") == "true"]
    assert baseline.info.status == "FINISHED" and "eval/perplexity" in baseline.data.metrics
    children = [r for r in runs if "sweep_key" in r.data.tags]
    # rank=4 with attention is in both sweeps: trained once, skipped by the second sweep
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert parents["mods"].data.tags["children_skipped"] == "1"
    assert (parents["ranks"].data.tags["sweep_axes"], parents["mods"].data.tags["sweep_axes"]) == (
        "rank",
        "target_modules",
    )
    # the study ends with its report: a run tagged report=true and the files, from exactly these runs
    (report,) = [r for r in runs if r.data.tags.get("report") == "true"]
    assert report.data.tags["report_scope_run_id"] == study.info.run_id
    assert report.data.tags["report_configurations"] == "3"
    assert "rank" in (tmp_path / "report" / "report.md").read_text()
    # and registers the winner: the child with the lowest perplexity, as version 1 of the model <experiment>
    best = min(children, key=lambda r: r.data.metrics["eval/perplexity"])
    registered = client.get_registered_model(experiment)
    assert str(registered.aliases["best"]) == "1" and registered.tags["report_run_id"] == report.info.run_id
    assert client.get_model_version_by_alias(experiment, "best").run_id == best.info.run_id

    again = mlflow_run(mlflow_server, experiment, params, entry_point="main")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already evaluated, skipped" in again.stdout
    assert len([r for r in runs_of(client, experiment) if "sweep_key" in r.data.tags]) == 3
