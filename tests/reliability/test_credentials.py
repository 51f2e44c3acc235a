"""Credentials are never printed or logged: a tracking URI's password, MLFLOW_TRACKING_PASSWORD and every value of
a variable whose name says it is secret (however short), in error lines, log records and a sweep child's copied
error; the health probe sends the credentials MLflow's client would send, so an authenticated server is reached."""

from __future__ import annotations

import base64
import http.server
import io
import logging
import threading

import mlflow
import pytest

from entrypoints import train as train_entry
from lora_efficiency.children import Outcome
from lora_efficiency.cli import quiet_log_records
from lora_efficiency.errors import TrackingError
from lora_efficiency.redaction import redact
from lora_efficiency.sweep import _child_error
from lora_efficiency.tracking import _probe_health, check_tracking_store
from tests.reliability.conftest import assert_one_line_error, run_entry_point


@pytest.mark.parametrize(
    "variable, value",
    [
        ("MLFLOW_TRACKING_PASSWORD", "pw"),
        ("MLFLOW_TRACKING_TOKEN", "t0k"),
        ("DB_PASSWORD", "x9"),
        ("MY_SERVICE_SECRET", "abc"),
        ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG"),
        ("SOME_API_KEY", "k"),
    ],
)
def test_every_value_of_a_secret_named_variable_is_masked(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    assert value not in redact(f"before {value} after")
    assert "***" in redact(f"before {value} after")


def test_switches_in_secret_named_variables_are_not_secrets(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert redact("step 1/10, loss 1.0, false") == "step 1/10, loss 1.0, false"


@pytest.mark.parametrize(
    "uri",
    ["http://alice:hunter2@mlflow.example:5000", "postgresql://u:hunter2@localhost:5432/db", "https://:hunter2@h/x"],
)
def test_a_uri_password_is_masked(uri):
    masked = redact(f"MLFLOW_TRACKING_URI={uri!r} cannot be reached")
    assert "hunter2" not in masked and ":***@" in masked


def test_an_unreachable_authenticated_uri_is_one_line_without_its_password(monkeypatch, tmp_path, capsys):
    """Was: the 'cannot be reached' line printed http://user:password@... in clear."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri("http://alice:hunter2@127.0.0.1:9")
    try:
        code, out, err = run_entry_point(train_entry.main, ["--device", "cpu", "--max_steps", "1"], capsys)
    finally:
        mlflow.set_tracking_uri(None)
    assert_one_line_error(code, err, "cannot be reached", "alice:***@127.0.0.1:9")
    assert "hunter2" not in out + err


class _AuthServer(http.server.BaseHTTPRequestHandler):
    """/health answers 200 to Basic alice:hunter2 only, 401 otherwise (a server behind basic auth)."""

    def do_GET(self):  # noqa: N802 - the http.server name
        expected = "Basic " + base64.b64encode(b"alice:hunter2").decode()
        self.send_response(200 if self.headers.get("Authorization") == expected else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _AuthServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_health_probe_sends_the_credentials_mlflow_would(auth_server, monkeypatch):
    """Was: urllib took `alice:hunter2@127.0.0.1` for the host, and a live server was declared unreachable."""
    _probe_health(f"http://alice:hunter2@{auth_server}")  # user info in the URI
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    _probe_health(f"http://{auth_server}")  # MLflow's own variables
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(Exception, match="401"):
        _probe_health(f"http://{auth_server}")


def test_a_refused_probe_is_a_tracking_error_naming_no_password(auth_server, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    mlflow.set_tracking_uri(f"http://alice:wrong-pass@{auth_server}")
    try:
        with pytest.raises(TrackingError) as err:
            check_tracking_store()
    finally:
        mlflow.set_tracking_uri(None)
    assert "401" in str(err.value) and "wrong-pass" not in str(err.value)


def test_a_sweep_childs_copied_error_is_masked(monkeypatch):
    """The sweep copies a child's last stderr line into the run's `error` tag and its failure list."""
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw1")
    stderr = "warning: x\nRuntimeError: POST http://bob:s3cret@host/api with pw1 and hf_AbCdEfGhIjKlMnOpQrStUv failed\n"
    error = _child_error(Outcome("r", 1, stderr, 1.0))
    assert "s3cret" not in error and "pw1" not in error and "hf_AbCd" not in error and "bob:***@host" in error
    assert "s3cret" not in _child_error(Outcome("r", -9, "error: http://bob:s3cret@host\n", 1.0))


def test_log_records_are_masked_and_tracebacks_leave_the_terminal(tmp_path, monkeypatch):
    """MLflow prints its tracking URI ("View run ... at: http://user:password@...") and, when a store fails
    mid-run, one traceback per failed batch: the terminal gets each record's first line, masked; the log file
    the whole of it."""
    monkeypatch.setenv("LORA_EFFICIENCY_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw2")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("mlflow")
    logger.addHandler(handler)
    try:
        quiet_log_records()
        logger.warning("View run at: %s", "http://carol:hunter2@host/#/runs/1 pw2")
        try:
            raise OSError(30, "Read-only file system")
        except OSError:
            logger.exception("Failed to log batch")
    finally:
        logger.removeHandler(handler)
    shown = stream.getvalue()
    assert "hunter2" not in shown and "pw2" not in shown and "carol:***@host" in shown
    assert "Traceback" not in shown and shown.splitlines()[-1] == "Failed to log batch"
    assert "OSError: [Errno 30] Read-only file system" in (tmp_path / "log").read_text()
