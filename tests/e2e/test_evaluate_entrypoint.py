"""`mlflow run . -e evaluate` on a train run, an adapter folder and the bare base; generate and merge."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import ROOT, mlflow_run, runs_of, subprocess_env

pytestmark = pytest.mark.e2e
EVAL = {"generate_samples": 4, "max_new_tokens": 8, "exact_match": "true"}


@pytest.fixture(scope="module")
def train_run(mlflow_server, tiny_model_dir, tiny_data_file):
    experiment = f"eval-{uuid.uuid4().hex[:8]}"
    params = {
        "model": tiny_model_dir,
        "data": tiny_data_file,
        "max_steps": 2,
        "batch_size": 2,
        "seq_len": 256,
        "quantization": "fp32",
        **EVAL,
    }
    proc = mlflow_run(mlflow_server, experiment, params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    (run,) = runs_of(client, experiment)
    mlflow.set_tracking_uri(mlflow_server)
    return client, experiment, run


def evaluate(mlflow_server, experiment, **params):
    # system metrics every 0.2 s: the tiny model's evaluation can end within a second
    return mlflow_run(mlflow_server, experiment, params, entry_point="evaluate", sampling_s=0.2)


def test_train_runs_carry_exact_match_samples_and_speed(train_run):
    client, _, run = train_run
    m = run.data.metrics
    assert 0 <= m["eval/exact_match"] <= m["eval/exact_match_normalized"] <= 1
    assert m["inference/decode_tokens_per_second"] > 0 and m["inference/merged_decode_tokens_per_second"] > 0
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/eval_samples.json"))
    assert table["columns"][:4] == ["prompt", "reference", "output", "correct"] and len(table["data"]) == 4


def test_evaluating_a_run_reproduces_it_and_twice_changes_nothing(train_run, mlflow_server):
    client, experiment, run = train_run
    proc = evaluate(mlflow_server, experiment, run_id=run.info.run_id, **EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already holds an evaluation with these settings" in proc.stdout
    ev = next(r for r in runs_of(client, experiment) if r.data.tags.get("evaluated_run_id") == run.info.run_id)
    assert ev.data.metrics["eval/perplexity"] == pytest.approx(run.data.metrics["eval/perplexity"], rel=1e-3)
    assert ev.data.metrics["eval/exact_match"] == run.data.metrics["eval/exact_match"]
    assert len(client.get_metric_history(run.info.run_id, "eval/loss")) == 1


def test_new_settings_write_into_the_run_once(train_run, mlflow_server):
    client, experiment, run = train_run
    for _ in range(2):
        proc = evaluate(
            mlflow_server, experiment, run_id=run.info.run_id, generate_samples=2, max_new_tokens=8, exact_match="true"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already holds" in proc.stdout  # the second time
    after = client.get_run(run.info.run_id)
    assert '"generate_samples": 2' in after.data.tags["eval_settings"]
    assert len(client.get_metric_history(run.info.run_id, "eval/loss")) == 2  # the train's own, then this one
    assert after.info.status == "FINISHED"


def test_baseline_is_its_own_tagged_run(mlflow_server, tiny_model_dir, tiny_data_file):
    experiment = f"base-{uuid.uuid4().hex[:8]}"
    proc = evaluate(
        mlflow_server,
        experiment,
        adapter="none",
        model=tiny_model_dir,
        data=tiny_data_file,
        quantization="fp32",
        seq_len=256,
        **EVAL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_of(MlflowClient(mlflow_server), experiment)
    assert run.data.tags["baseline"] == "true" and run.data.tags["eval_kind"] == "baseline"
    expected = {"eval/loss", "eval/perplexity", "eval/exact_match", "inference/decode_tokens_per_second"}
    assert expected <= set(run.data.metrics)
    ((dataset, tags),) = [(d.dataset, {t.key: t.value for t in d.tags}) for d in run.inputs.dataset_inputs]
    assert (dataset.name, dataset.digest) == ("tiny-eval", run.data.tags["data_fingerprint"])
    assert tags["mlflow.data.context"] == "eval"
    assert run.data.tags["mlflow.note.content"].startswith("Evaluates the base model alone")
    # sampled every 0.2 s (evaluate() above): loading and evaluating the tiny model takes longer than that
    assert any(k.startswith("system/") for k in run.data.metrics), "system metrics are on"


def direct(mlflow_server, *args):
    env = subprocess_env(MLFLOW_TRACKING_URI=mlflow_server)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("case", ["missing run", "run without adapter", "pickle adapter", "no references"])
def test_bad_targets_are_one_line_errors(case, train_run, mlflow_server, tmp_path, tiny_model_dir):
    client, experiment, run = train_run
    args = {
        "missing run": ["--run_id", "0" * 32],
        "pickle adapter": ["--adapter", str(tmp_path)],
        "no references": ["--run_id", run.info.run_id, "--data", "python-docs", "--exact_match", "true"],
    }.get(case)
    if case == "pickle adapter":
        (tmp_path / "adapter_config.json").write_text("{}")
        torch.save({"w": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    if case == "run without adapter":
        base = next(r for r in runs_of(client, experiment) if r.data.tags.get("entry_point") == "evaluate")
        args = ["--run_id", base.info.run_id]
    before = {r.info.run_id for r in runs_of(client, experiment)}
    proc = direct(mlflow_server, "entrypoints.evaluate", *args, "--model", str(tiny_model_dir))
    expected = {
        "missing run": f"run_id='{'0' * 32}' does not exist in the tracking store",
        "run without adapter": "has no adapter artifact: pass the id of a finished train run",
        "pickle adapter": "it holds the pickle file adapter_model.bin, which is refused",
        "no references": "exact_match=true but data='python-docs' (python-docs) is plain text",
    }[case]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert {r.info.run_id for r in runs_of(client, experiment)} == before  # nothing written, no run left behind


def test_generate_and_merge(train_run, mlflow_server, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_efficiency.inference import download_adapter, merge

    _, _, run = train_run
    proc = direct(
        mlflow_server,
        "entrypoints.generate",
        "--run_id",
        run.info.run_id,
        "--prompt",
        "Compute 2 + 2.",
        "--max_new_tokens",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapter = download_adapter(run.info.run_id)
    out = merge(model=str(tiny_model_dir), adapter=adapter, output_dir=tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    attached = PeftModel.from_pretrained(base, str(adapter))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, attached(ids).logits, rtol=1e-4, atol=1e-4)
    assert not list(out.glob("adapter_*"))  # a plain model folder


def test_generate_and_merge_take_a_registered_alias_and_name_what_is_missing(train_run, mlflow_server, tmp_path):
    client, experiment, run = train_run
    name = f"winners-{uuid.uuid4().hex[:8]}"
    version = mlflow.register_model(run.data.tags["model_uri"], name)  # models:/<model id>, the run's model
    client.set_registered_model_alias(name, "best", version.version)
    args = ["--prompt", "Compute 2 + 2.", "--max_new_tokens", "4"]
    by_alias = direct(mlflow_server, "entrypoints.generate", "--run_id", f"models:/{name}@best", *args)
    by_run = direct(mlflow_server, "entrypoints.generate", "--run_id", run.info.run_id, *args)
    assert by_alias.returncode == 0, by_alias.stderr[-2000:]
    assert by_alias.stdout == by_run.stdout  # the same adapter, the same greedy answer
    merged = direct(
        mlflow_server,
        "entrypoints.merge",
        "--run_id",
        f"runs:/{run.info.run_id}/model",
        "--output",
        str(tmp_path / "m"),
    )
    assert merged.returncode == 0 and (tmp_path / "m" / "config.json").is_file(), merged.stderr[-2000:]
    proc = direct(mlflow_server, "entrypoints.generate", "--run_id", f"models:/{name}@worst", *args)
    assert proc.returncode == 2
    assert (
        proc.stderr
        == f"error: run_id='models:/{name}@worst': '{name}' has no alias 'worst'; its aliases: best (version 1)\n"
    )
