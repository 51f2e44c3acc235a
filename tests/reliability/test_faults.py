"""Faults: the tracking server unreachable at start, dropping mid-run (a real `mlflow server` stopped and started
again on the same port and SQLite file), or gone for good; artifact storage failing. Never a silent gap."""

from __future__ import annotations

import errno
import sqlite3
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from entrypoints import train as train_entry
from tests.conftest import ROOT, _free_port, runs_of, subprocess_env
from tests.reliability.conftest import assert_one_line_error, run_entry_point, statuses

STEP_METRICS = ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_second", "perf/step_time_ms")
TINY = ["--batch_size", "2", "--seq_len", "128", "--eval_samples", "2", "--generate_samples", "0", "--device", "cpu"]


def steps_in_store(db, run_id: str) -> dict[str, int]:
    """Distinct steps per metric, counted in the server's SQLite file itself."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT key, COUNT(DISTINCT step) FROM metrics WHERE run_uuid = ? GROUP BY key", (run_id,)
        ).fetchall()
    return dict(rows)


def test_unreachable_server_fails_before_training(tiny_model_dir, tiny_data_file, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    t0 = time.perf_counter()
    argv = ["--model", tiny_model_dir, "--data", tiny_data_file, "--max_steps", "2", *TINY]
    code, out, err = run_entry_point(train_entry.main, argv, capsys)
    mlflow.set_tracking_uri(None)
    assert_one_line_error(code, err, f"MLFLOW_TRACKING_URI='{uri}' cannot be reached")
    assert "step 1/" not in out
    assert time.perf_counter() - t0 < 30  # not MLflow's ~4 min of retries


def test_unwritable_artifact_storage_fails_before_training(store, tiny_model_dir, tiny_data_file, tmp_path, capsys):
    """Root ignores file modes, so a read-only folder cannot be made here: the artifact root lies under a regular
    file instead (ENOTDIR), the same OSError path as EACCES, EROFS or ENOSPC."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    store.create_experiment("reliability", artifact_location=str(tmp_path / "blocker" / "artifacts"))
    argv = ["--model", tiny_model_dir, "--data", tiny_data_file, "--max_steps", "2", *TINY]
    code, out, err = run_entry_point(train_entry.main, argv, capsys)
    assert_one_line_error(code, err, "artifact storage", "is not writable")
    assert "step 1/" not in out and statuses(store) == ["FAILED"]


def test_artifact_storage_failing_mid_run_fails_the_run(store, tiny_model_dir, tiny_data_file, monkeypatch, capsys):
    """The disk fills up after training (simulated: every artifact upload raises ENOSPC)."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlflow, "log_artifacts", full)
    argv = ["--model", tiny_model_dir, "--data", tiny_data_file, "--max_steps", "2", *TINY]
    code, out, err = run_entry_point(train_entry.main, argv, capsys)
    assert_one_line_error(code, err, "artifact storage", "failed writing adapter", "No space left on device")
    assert "step 2/" in out and statuses(store) == ["FAILED"]


def train_process(uri: str, tiny_model_dir, tiny_data_file, steps: int, **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "entrypoints.train", "--model", tiny_model_dir, "--data", tiny_data_file]
    cmd += ["--max_steps", str(steps), *TINY]
    environment = subprocess_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="drop", OMP_NUM_THREADS="1", **env)
    return subprocess.Popen(
        [str(c) for c in cmd], env=environment, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_server_dropping_mid_run_loses_no_step(server, tiny_model_dir, tiny_data_file):
    """The server is killed after step 5 and started again ~8 s later: MLflow's retries (7, backoff 2 s doubling)
    carry the queued batches over; every step of every metric is in the SQLite file when the run ends."""
    steps = 40
    proc = train_process(server.uri, tiny_model_dir, tiny_data_file, steps)
    for line in proc.stdout:
        if line.startswith("step 5/"):
            break
    server.stop(kill=True)
    down = time.perf_counter()
    time.sleep(8)
    server.start()
    print(f"server down for {time.perf_counter() - down:.1f} s")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (run,) = runs_of(MlflowClient(server.uri), "drop")
    assert run.info.status == "FINISHED"
    counts = steps_in_store(server.db, run.info.run_id)
    assert all(counts.get(key) == steps for key in STEP_METRICS), counts
    assert "eval/loss" in run.data.metrics


def test_server_gone_for_good_fails_loudly(server, tiny_model_dir, tiny_data_file):
    """With retries cut to 1 and the server never back, the process exits non-zero with one error line naming the
    store: the run cannot be marked FAILED (the store is gone), but nothing pretends it finished."""
    proc = train_process(
        server.uri,
        tiny_model_dir,
        tiny_data_file,
        20,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
    )
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    server.stop(kill=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"MLFLOW_TRACKING_URI='{server.uri}'" in errors[0], err[-3000:]
    assert "Traceback" not in err
    server.start()  # back, to look: the run did not end FINISHED
    (run,) = runs_of(MlflowClient(server.uri), "drop")
    assert run.info.status != "FINISHED"


@pytest.fixture(autouse=True)
def _no_active_run():
    yield
    while mlflow.active_run():
        mlflow.end_run("FAILED")
