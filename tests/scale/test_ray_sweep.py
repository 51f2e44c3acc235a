"""`mlflow run . -e sweep -P backend=ray` on a local Ray instance with 2 workers, logging to one MLflow server."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import ROOT, mlflow_run, runs_of, subprocess_env, tiny_sweep_base

pytestmark = pytest.mark.e2e
RAY = {"backend": "ray", "max_concurrent": 2, "cpus_per_trial": 1}


def _children(client, experiment):
    return [r for r in runs_of(client, experiment) if "sweep_key" in r.data.tags]


def test_ray_sweep_runs_children_concurrently_once_each_and_isolates_a_failure(
    mlflow_server, tiny_model_dir, tiny_data_file, tmp_path
):
    # batch_size 64 passes the up-front checks but not the 26 packed rows of the tiny set: it fails at run time
    configurations = [{"rank": 2}, {"rank": 4}, {"rank": 8, "batch_size": 64}]
    spec = {"name": "tiny-ray", "base": tiny_sweep_base(tiny_model_dir, tiny_data_file), "seeds": [0]}
    config = tmp_path / "ray.yaml"
    config.write_text(yaml.safe_dump({**spec, "configurations": configurations}))
    experiment = f"ray-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server)

    done = mlflow_run(mlflow_server, experiment, {"config": config, **RAY}, entry_point="sweep")
    assert done.returncode != 0  # one child failed: the sweep says so
    assert "1 of 3 runs of sweep 'tiny-ray' failed" in done.stderr and "Traceback" not in done.stderr
    assert "local instance: 2 CPUs" in done.stdout

    runs = _children(client, experiment)
    by_status = Counter(r.info.status for r in runs)
    assert len(runs) == 3 and by_status == {"FINISHED": 2, "FAILED": 1}
    assert len({r.data.tags["sweep_key"] for r in runs}) == 3  # every configuration ran exactly once
    (failed,) = [r for r in runs if r.info.status == "FAILED"]
    assert failed.data.tags["sweep_configuration"] == "batch_size=64,rank=8,seed=0"  # safe_dump sorts keys
    assert "batch_size=64" in failed.data.tags["error"]
    parent = next(r for r in runs_of(client, experiment) if r.data.tags.get("entry_point") == "sweep")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert {r.data.tags["sweep_backend"] for r in runs} == {"ray"}
    assert (parent.data.tags["children_finished"], parent.data.tags["children_failed"]) == ("2", "1")
    # two children ran at the same time: some pair's [start, end] intervals overlap in MLflow
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1)), spans
    for run in runs:
        if run.info.status == "FINISHED":
            assert run.data.metrics["eval/loss"] > 0
            assert "adapter/adapter_model.safetensors" in {
                f.path for f in client.list_artifacts(run.info.run_id, "adapter")
            }

    again = mlflow_run(mlflow_server, experiment, {"config": config, **RAY}, entry_point="sweep")
    assert "2 skipped (already FINISHED), 1 failed" in again.stdout
    finished = Counter(r.data.tags["sweep_key"] for r in _children(client, experiment) if r.info.status == "FINISHED")
    assert len(finished) == 2 and set(finished.values()) == {1}  # nothing finished twice
    assert all(r.info.status != "RUNNING" for r in runs_of(client, experiment))


def test_a_cluster_address_with_a_local_tracking_file_is_refused_before_any_run(tmp_path):
    config = ROOT / "configs" / "sweeps" / "rank.yaml"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [sys.executable, "-m", "entrypoints.sweep", "--config", str(config), "--backend", "ray"]
    done = subprocess.run(
        [*cmd, "--ray_address", "auto"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        timeout=300,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ray_address='auto' needs a tracking store every node reaches")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was opened, so nothing is left RUNNING


def test_the_study_runs_its_sweeps_children_on_ray(mlflow_server, tiny_model_dir, tiny_data_file, tmp_path):
    """`-e main -P backend=ray`: the tiny study's child is a Ray task (sweep.run_sweep's Ray path), its report is
    written from it."""
    path = tmp_path / "ranks.yaml"
    spec = {"name": "ranks", "base": tiny_sweep_base(tiny_model_dir, tiny_data_file), "axes": {"rank": [2]}}
    path.write_text(yaml.safe_dump({**spec, "seeds": [0]}))
    experiment = f"ray-study-{uuid.uuid4().hex[:8]}"
    params = {"profile": "", "sweeps": str(path), "baselines": "fp32", "output": str(tmp_path / "report"), **RAY}
    done = mlflow_run(mlflow_server, experiment, params, entry_point="main")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "local instance: 2 CPUs" in done.stdout
    client = MlflowClient(mlflow_server)
    runs = runs_of(client, experiment)
    study = next(r for r in runs if r.data.tags.get("entry_point") == "main")
    assert study.data.params["backend"] == "ray" and study.info.status == "FINISHED"
    children = _children(client, experiment)
    (child,) = children  # one child keeps this test short: concurrency is test_ray_sweep_runs_children_...'s
    assert child.info.status == "FINISHED" and child.data.params["rank"] == "2"
    assert child.data.tags["sweep_backend"] == "ray" and child.data.tags["ray_node_id"]
    (report,) = [r for r in runs if r.data.tags.get("report") == "true"]
    assert report.data.tags["report_configurations"] == "1" and (tmp_path / "report" / "report.md").is_file()
