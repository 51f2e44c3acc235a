"""Helpers of the reliability suite: entry points run in this process (no ~7 s of imports per case), a store per
test, and a real `mlflow server` that a test can stop and start again on the same port and SQLite file."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import MlflowServer as Server


def run_entry_point(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `run_cli(main, argv)`; an uncaught exception (a traceback) fails the test."""
    from lora_efficiency.cli import run_cli

    try:
        run_cli(main, [str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        while mlflow.active_run():  # never leak a run into the next test
            mlflow.end_run("FAILED")
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2, one `error:` line (MLflow's own INFO log lines may come before it), no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-2000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An SQLite store and artifact folder of this test alone, in an empty working folder; yields a client."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default artifact root (./mlruns) lands here, not in the repository
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "reliability")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def statuses(client: MlflowClient, experiment: str = "reliability") -> list[str]:
    exp = client.get_experiment_by_name(experiment)
    return [r.info.status for r in client.search_runs([exp.experiment_id])] if exp else []


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "server")
    srv.root.mkdir()
    yield srv.start()
    srv.stop()
