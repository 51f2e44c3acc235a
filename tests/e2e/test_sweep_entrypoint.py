"""`mlflow run . -e sweep` on a tiny model: kill -9 and resume, up-front validation, failure isolation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import ROOT, mlflow_run, runs_of, subprocess_env, tiny_sweep_base

pytestmark = pytest.mark.e2e


def sweep_file(tmp_path, tiny_model_dir, tiny_data_file, **spec) -> str:
    base = tiny_sweep_base(tiny_model_dir, tiny_data_file)
    path = tmp_path / f"sweep-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "base": base, "seeds": [0], **spec}))
    return str(path)


def children(client, experiment):
    return [r for r in runs_of(client, experiment) if "sweep_key" in r.data.tags]


def test_killed_sweep_resumes_without_running_anything_twice(mlflow_server, tiny_model_dir, tiny_data_file, tmp_path):
    config = sweep_file(tmp_path, tiny_model_dir, tiny_data_file, axes={"rank": [2, 4, 8]})
    experiment = f"sweep-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "sweep",
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
        "-P",
        f"config={config}",
    ]
    proc = subprocess.Popen(
        cmd,
        env=subprocess_env(MLFLOW_TRACKING_URI=mlflow_server),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not any(r.info.status == "FINISHED" for r in children(client, experiment)):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before its first child finished"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole tree: mlflow run, the sweep and the child in flight
    proc.wait()
    assert Counter(r.info.status for r in children(client, experiment))["FINISHED"] == 1

    again = mlflow_run(mlflow_server, experiment, {"config": config}, entry_point="sweep")
    assert again.returncode == 0, again.stderr[-3000:]
    runs = children(client, experiment)
    finished = Counter(r.data.tags["sweep_key"] for r in runs if r.info.status == "FINISHED")
    assert len(finished) == 3 and set(finished.values()) == {1}  # every configuration exactly once
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs)  # the interrupted child was marked FAILED
    assert all("orphaned" in r.data.tags["error"] for r in runs if r.info.status == "FAILED")
    parent = next(
        r
        for r in runs_of(client, experiment)
        if r.data.tags.get("entry_point") == "sweep" and r.info.status == "FINISHED"
    )
    tags = parent.data.tags
    assert (tags["children_total"], tags["children_skipped"], tags["children_failed"]) == ("3", "1", "0")
    assert tags["children_finished"] == "2" and tags["sweep_axes"] == "rank"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} >= {parent.info.run_id}
    # the killed sweep's own parent run too: FAILED by the restart, not RUNNING for good
    sweeps = [r for r in runs_of(client, experiment) if r.data.tags.get("entry_point") == "sweep"]
    assert sorted(r.info.status for r in sweeps) == ["FAILED", "FINISHED"]


def test_every_configuration_is_checked_before_the_first_runs(mlflow_server, tiny_model_dir, tiny_data_file, tmp_path):
    config = sweep_file(tmp_path, tiny_model_dir, tiny_data_file, axes={"rank": [4, 0], "lr": [1e-3, "fast"]})
    experiment = f"sweep-bad-{uuid.uuid4().hex[:8]}"
    proc = mlflow_run(mlflow_server, experiment, {"config": config}, entry_point="sweep")
    assert proc.returncode != 0
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "lr=0.001,rank=0] rank=0 is invalid: an integer >= 1" in error  # each problem names its configuration
    assert "lr=fast,rank=4] lr='fast' is invalid: a number" in error
    assert children(MlflowClient(mlflow_server), experiment) == []


def test_one_failing_configuration_does_not_stop_the_others(mlflow_server, tiny_model_dir, tiny_data_file, tmp_path):
    configurations = [{"target_modules": "q_proj"}, {"target_modules": "not_a_module"}, {"target_modules": "v_proj"}]
    config = sweep_file(tmp_path, tiny_model_dir, tiny_data_file, configurations=configurations)
    experiment = f"sweep-fail-{uuid.uuid4().hex[:8]}"
    proc = mlflow_run(mlflow_server, experiment, {"config": config}, entry_point="sweep")
    assert proc.returncode != 0
    assert "1 of 3 runs of sweep 'tiny' failed" in proc.stderr
    client = MlflowClient(mlflow_server)
    status = {r.data.tags["sweep_configuration"]: r for r in children(client, experiment)}
    assert status["target_modules=not_a_module,seed=0"].info.status == "FAILED"
    assert "not_a_module matches no linear module" in status["target_modules=not_a_module,seed=0"].data.tags["error"]
    assert status["target_modules=q_proj,seed=0"].info.status == "FINISHED"
    assert status["target_modules=v_proj,seed=0"].info.status == "FINISHED"
    parent = next(r for r in runs_of(client, experiment) if r.data.tags.get("entry_point") == "sweep")
    assert (parent.data.tags["children_finished"], parent.data.tags["children_failed"]) == ("2", "1")
