"""`mlflow run . -e prepare` end to end, and `train -P data=<the prepare run's id>`."""

from __future__ import annotations

import json
import uuid

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import mlflow_run, runs_of

pytestmark = pytest.mark.e2e


def test_prepare_logs_its_manifest_and_train_accepts_its_run_id(mlflow_server, tiny_model_dir, tiny_data_file):
    experiment = f"prep-{uuid.uuid4().hex[:8]}"
    proc = mlflow_run(
        mlflow_server,
        experiment,
        {"dataset": tiny_data_file, "model": tiny_model_dir, "seq_len": 256},
        entry_point="prepare",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepared tiny: 72 train / 8 eval examples" in proc.stdout
    client = MlflowClient(mlflow_server)
    (prep,) = runs_of(client, experiment)
    assert prep.info.status == "FINISHED"
    assert prep.data.metrics["data/train_count"] == 72 and prep.data.metrics["data/eval_count"] == 8
    assert 0 <= prep.data.metrics["data/padding_fraction_packed"] < prep.data.metrics["data/padding_fraction_unpacked"]
    mlflow.set_tracking_uri(mlflow_server)
    manifest = json.loads(mlflow.artifacts.load_text(f"runs:/{prep.info.run_id}/manifest.json"))
    assert manifest["fingerprint"] == prep.data.tags["data_fingerprint"]
    assert manifest["train"]["count"] == 72
    fingerprint = prep.data.tags["data_fingerprint"]
    expected = {"train": ("tiny-train", fingerprint, "72"), "eval": ("tiny-eval", fingerprint, "8")}
    assert dataset_inputs(prep) == expected
    (source,) = {json.loads(d.dataset.source)["uri"] for d in prep.inputs.dataset_inputs}
    assert source.endswith(str(tiny_data_file))  # the file the records came from
    assert prep.data.tags["mlflow.note.content"].startswith("Prepares data")
    # System metrics are on for prepare as for evaluate (tracking.start_run's default; the evaluate e2e test sees
    # them), but MLflow logs none for a run that ends before its first sample, as a prepare of a cached folder does.

    proc = mlflow_run(
        mlflow_server,
        experiment,
        {"data": prep.info.run_id, "model": tiny_model_dir, "max_steps": 2, "batch_size": 2, "seq_len": 256},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = next(r for r in runs_of(client, experiment) if r.info.run_id != prep.info.run_id)
    assert train.info.status == "FINISHED"
    assert train.data.tags["data_fingerprint"] == prep.data.tags["data_fingerprint"]
    assert train.data.params["data_path"] == prep.data.tags["prepared_path"]
    assert dataset_inputs(train) == expected  # the same two datasets: the UI links the runs through them
    assert train.data.tags["mlflow.note.content"].startswith("LoRA r=")


def dataset_inputs(run) -> dict[str, tuple[str, str, str]]:
    """{context: (name, digest, rows)} of a run's dataset inputs."""
    found = {}
    for d in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in d.tags}
        found[tags["mlflow.data.context"]] = (d.dataset.name, d.dataset.digest, tags["rows"])
    return found


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "error: dataset='no-such-set' is invalid: one of alpaca-cleaned"),
        ("id,question_text\n1,hi\n", "no prompt/response columns: found id, question_text"),
    ],
)
def test_bad_data_is_one_line_and_leaves_no_run_running(mlflow_server, tiny_model_dir, tmp_path, content, message):
    dataset = "no-such-set"
    if content is not None:
        dataset = tmp_path / "bad.csv"
        dataset.write_text(content)
    experiment = f"prep-bad-{uuid.uuid4().hex[:8]}"
    proc = mlflow_run(mlflow_server, experiment, {"dataset": dataset, "model": tiny_model_dir}, entry_point="prepare")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert [r.info.status for r in runs_of(MlflowClient(mlflow_server), experiment)] == ["FAILED"]
