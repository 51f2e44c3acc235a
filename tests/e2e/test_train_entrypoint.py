"""`mlflow run . -e train` end to end on a tiny model, logging over HTTP to a real `mlflow server`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from lora_efficiency.configuration import TRAIN_SETTINGS
from tests.conftest import ROOT, mlflow_run, runs_of, subprocess_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(mlflow_server, tiny_model_dir, tiny_data_file):
    experiment = f"e2e-{uuid.uuid4().hex[:8]}"
    proc = mlflow_run(
        mlflow_server,
        experiment,
        {
            "model": tiny_model_dir,
            "data": tiny_data_file,
            "max_steps": 3,
            "batch_size": 2,
            "seq_len": 256,
            "rank": 8,
            "lr": "2e-4",
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server)
    (run,) = runs_of(client, experiment)
    return client, run


def test_run_finished_with_every_resolved_param(trained):
    _, run = trained
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert set(TRAIN_SETTINGS) <= set(params)
    assert params["rank"] == "8" and params["lr"] == "2e-4"  # as `mlflow run` logged them, no clash
    assert params["target_modules_resolved"] == "k_proj,o_proj,q_proj,v_proj"
    assert params["quantization"] == "nf4" and params["compute_dtype"] == "bfloat16"
    assert params["device"] == "auto" and params["device_resolved"] == "cpu"


def test_metrics_per_step_and_summary(trained):
    client, run = trained
    for key in ("train/loss", "train/lr", "perf/tokens_per_second", "perf/step_time_ms", "memory/current_mb"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    m = run.data.metrics
    for key in (
        "memory/peak_mb",
        "params/trainable",
        "params/total",
        "adapter/size_mb",
        "time/train_s",
        "eval/loss",
        "eval/perplexity",
    ):
        assert key in m, key
    assert m["eval/perplexity"] == pytest.approx(math.exp(m["eval/loss"]))
    # forgetting: general text (the Python reference) before the first step and after the last, and their ratio
    assert m["forget/ratio"] == pytest.approx(m["forget/perplexity"] / m["forget/base_perplexity"])
    assert m["forget/perplexity"] == pytest.approx(math.exp(m["forget/loss"])) and m["forget/tokens"] > 0
    assert m["forget/ratio"] != 1.0  # three steps at lr 2e-4 moved the adapter: the text scores differently
    # 2 layers x r8 x (q 64+64, k 64+32, v 64+32, o 64+64) = 7,168 trainable parameters
    assert m["params/trainable"] == 7168
    assert m["memory/peak_mb"] > 100  # the RSS of a process holding torch and a model
    assert any(k.startswith("system/") for k in m), "MLflow system metrics are on"


def test_tags(trained):
    _, run = trained
    tags = run.data.tags
    assert len(tags["config_hash"]) == 16
    assert tags["base_model"] == "tiny-llama0" and tags["base_model_revision"].startswith("local-")
    assert len(tags["data_fingerprint"]) == 16
    assert tags["device_name"].startswith("cpu")
    assert tags["git_commit"] and tags["entry_point"] == "train"


def test_artifacts_hold_the_adapter_only(trained):
    client, run = trained
    files = {f.path: f.file_size for f in client.list_artifacts(run.info.run_id, "adapter")}
    adapter_files = {"README.md", "adapter_config.json", "adapter_model.safetensors", "base_model.json"}
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}  # as HF Trainer saves them
    assert set(files) == {f"adapter/{f}" for f in adapter_files | tokenizer_files}
    assert files["adapter/adapter_model.safetensors"] < 100_000  # the tiny base alone is ~13 MB
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config.json", "memory_trace.csv", "per_example_losses.json"} <= top


def test_every_held_out_example_is_logged_with_its_loss(trained):
    _, run = trained
    logged = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/per_example_losses.json"))
    table = pd.DataFrame(logged["data"], columns=logged["columns"])  # MLflow's table format (mlflow.log_table)
    assert list(table.columns) == ["example", "task", "tokens", "loss"]
    m = run.data.metrics
    # every scored example once (their target tokens add up to the run's), at most eval_samples of them
    assert 0 < len(table) <= int(run.data.params["eval_samples"]) and table["example"].is_unique
    assert table["tokens"].sum() == m["eval/tokens"]
    # token-weighted, the examples give back the run's eval/loss
    assert (table["loss"] * table["tokens"]).sum() / table["tokens"].sum() == pytest.approx(m["eval/loss"], rel=1e-6)


def test_adapter_from_mlflow_reproduces_eval_loss(trained, tiny_model_dir, tiny_data_file):
    from peft import PeftModel

    from lora_efficiency.data import unpacked
    from lora_efficiency.evaluation import evaluate_loss
    from lora_efficiency.models import load_base_model, load_tokenizer, resolve_model
    from lora_efficiency.prepare import load_prepared

    _, run = trained
    adapter = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter")
    source = resolve_model(str(tiny_model_dir))
    base = load_base_model(
        source,
        quantization="nf4",
        double_quant=True,
        device=torch.device("cpu"),
        attention=run.data.params["attention"],  # as the run scored it: sdpa instead moved the loss by 3.4e-4
    )
    model = PeftModel.from_pretrained(base, adapter)
    tokenizer = load_tokenizer(source)
    prepared = load_prepared(run.data.params["data_path"])
    rows = unpacked(prepared.eval)
    result = evaluate_loss(  # on the batches the run scored (its eval batch size, grouped by task family)
        model,
        rows,
        batch_size=int(run.data.params["eval_batch_size"]),
        pad_id=tokenizer.pad_token_id,
        device=torch.device("cpu"),
        autocast_dtype=torch.bfloat16,
        families=[e.task for e in prepared.eval_examples],
    )
    assert result["eval/loss"] == pytest.approx(run.data.metrics["eval/loss"], rel=1e-4)


PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
listed = model.predict(["What is 2 + 2?", "Name a colour."], params={"max_new_tokens": 4})
framed = model.predict(pd.DataFrame({"prompt": ["What is 2 + 2?"]}), params={"max_new_tokens": 4})
print(json.dumps({"listed": listed, "framed": framed}))
"""


def test_the_run_logs_an_adapter_only_mlflow_model_that_answers_in_a_fresh_process(trained, mlflow_server):
    import json

    client, run = trained
    (logged,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id='{run.info.run_id}'"
    )
    assert logged.name == "lora-r8-attention-nf4-seed0"  # after its configuration and seed, not `model`
    assert run.data.tags["model_uri"] == f"models:/{logged.model_id}"
    signature = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/{logged.name}").signature
    assert signature.inputs.input_types() == [mlflow.types.DataType.string]
    assert signature.params.params[0].name == "max_new_tokens"
    # adapter-only: the base's weights (the tiny one: ~13 MB) are referenced, not copied
    weights = [f.path for f in _walk(client, logged.model_id, "") if f.path.endswith(".safetensors")]
    assert weights == ["artifacts/adapter/adapter_model.safetensors"]
    assert run.data.metrics["model/size_mb"] < 5  # the adapter's files, the tokenizer (3.4 MB) and this code
    # where the run's time went: phases that follow one another inside the run's own wall clock
    phases = [run.data.metrics[f"time/{p}_s"] for p in ("train", "evaluation", "model_logging")]
    assert all(t > 0 for t in phases) and run.data.metrics["time/startup_s"] > 0
    assert sum(phases) < (run.info.end_time - run.info.start_time) / 1000
    env = subprocess_env(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    proc = subprocess.run(
        [sys.executable, "-c", PREDICT, run.data.tags["model_uri"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(answers["listed"]) == 2 and len(answers["framed"]) == 1
    assert all(isinstance(a, str) for a in answers["listed"] + answers["framed"])
    assert answers["framed"][0] == answers["listed"][0]  # greedy: the same prompt, the same answer


def test_mlflow_models_serve_answers_a_request_over_loopback(trained, mlflow_server, tmp_path):
    """A real `mlflow models serve` process (--env-manager local) on 127.0.0.1: a list and a DataFrame."""
    import json
    import os
    import signal
    import time
    import urllib.request

    from tests.conftest import _free_port

    _, run = trained
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", run.data.tags["model_uri"]]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    env = subprocess_env(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def post(body: dict) -> list:
        request = urllib.request.Request(
            f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        return json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]

    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        listed = post({"inputs": ["What is 2 + 2?"], "params": {"max_new_tokens": 4}})
        framed = post({"dataframe_records": [{"prompt": "What is 2 + 2?"}], "params": {"max_new_tokens": 4}})
        assert len(listed) == 1 and isinstance(listed[0], str) and framed == listed
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _walk(client, model_id, path):
    for f in client.list_logged_model_artifacts(model_id, path or None):
        yield from (_walk(client, model_id, f.path) if f.is_dir else [f])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"rank": 0}, "error: rank=0 is invalid: an integer >= 1"),
        ({"rank": -1}, "error: rank=-1 is invalid: an integer >= 1"),
        ({"rank": "abc"}, "error: rank='abc' is invalid: an integer"),
        ({"quantization": "q3"}, "error: quantization='q3' is invalid: one of nf4, fp4, int8, bf16, fp16, fp32"),
        ({"model": "/does/not/exist"}, "error: model='/does/not/exist' does not exist"),
        ({"target_modules": "qkv"}, "error: target_modules='qkv': qkv matches no linear module"),
        ({"sharding": "fsdp"}, "error: sharding='fsdp' is invalid with num_processes=1: 2 to 256 processes"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_run_running(
    mlflow_server, tiny_model_dir, tiny_data_file, params, message
):
    experiment = f"bad-{uuid.uuid4().hex[:8]}"
    proc = mlflow_run(mlflow_server, experiment, {"model": tiny_model_dir, "data": tiny_data_file, **params})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    statuses = [r.info.status for r in runs_of(MlflowClient(mlflow_server), experiment)]
    assert statuses == ["FAILED"]


def test_without_mlflow_run_bad_input_creates_no_run(tmp_path):
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.train", "--rank", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: rank=0 is invalid: an integer >= 1"
    assert not (tmp_path / "mlflow.db").exists()


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, tiny_model_dir, tiny_data_file):
    env = subprocess_env(PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "entrypoints.train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_data_file),
            "--max_steps",
            "1",
            "--batch_size",
            "2",
            "--seq_len",
            "128",
            "--eval_samples",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = runs_of(client, "lora-efficiency")
    assert run.info.status == "FINISHED"
    assert (tmp_path / "mlruns").is_dir()


def test_sigterm_leaves_the_run_failed_not_running(tmp_path, tiny_model_dir, tiny_data_file):
    import signal
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="term")
    cmd = [
        sys.executable,
        "-m",
        "entrypoints.train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tiny_data_file),
        "--max_steps",
        "100000",
        "--batch_size",
        "2",
        "--seq_len",
        "128",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the first step line: the run exists and training is under way
        if line.startswith("step 1/"):
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "error: interrupted" in stderr
    time.sleep(0.5)
    (run,) = runs_of(MlflowClient(uri), "term")
    assert run.info.status == "FAILED"


def test_a_run_is_its_settings_file(trained, mlflow_server):
    """settings.yaml holds every setting and the model folder's content revision; `-P config=runs:/<id>/...`
    trains the same run again: the same config_hash and eval/loss (CPU, same seed), no other -P needed."""
    from lora_efficiency.config import load_yaml

    client, run = trained
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/settings.yaml")
    settings = load_yaml(text)
    flat = {name: value for group in settings["train"].values() for name, value in group.items()}  # by group
    assert set(flat) == set(TRAIN_SETTINGS)
    assert settings["train"]["adapter"]["rank"] == 8 and settings["train"]["optimization"]["max_steps"] == 3
    assert settings["resolved"]["base_model_revision"] == run.data.tags["base_model_revision"]
    assert settings["resolved"]["base_model_revision"].startswith("local-")  # the tiny model's folder content
    assert settings["resolved"]["config_hash"] == run.data.tags["config_hash"]
    experiment = f"e2e-rerun-{uuid.uuid4().hex[:8]}"
    proc = mlflow_run(mlflow_server, experiment, {"config": f"runs:/{run.info.run_id}/settings.yaml"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (again,) = runs_of(client, experiment)
    assert again.data.tags["config_hash"] == run.data.tags["config_hash"]
    assert again.data.params["rank"] == "8" and again.data.params["max_steps"] == "3"
    assert again.data.metrics["eval/loss"] == pytest.approx(run.data.metrics["eval/loss"], abs=1e-6)
