"""One training over 2 processes (DDP, gloo on the CPU) against one process with the same global batch.

Launched the way a user launches it: `accelerate launch` directly, and `mlflow run -P num_processes=2` (train
relaunches itself under accelerate). fp32 and dropout 0, so the two must agree to float rounding, not statistically.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, _free_port, mlflow_run, runs_of, subprocess_env

TINY = {
    "max_steps": 4,
    "seq_len": 256,
    "eval_samples": 4,
    "generate_samples": 2,
    "max_new_tokens": 4,
    "quantization": "fp32",
    "dropout": 0,
    "device": "cpu",
}


def _argv(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k}", str(v))]


def _train(cmd_prefix: list[str], tracking_uri: str, experiment: str, settings: dict) -> subprocess.CompletedProcess:
    env = subprocess_env(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_EXPERIMENT_NAME=experiment)
    cmd = [*cmd_prefix, "-m", "entrypoints.train", *_argv(settings)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _losses(client: MlflowClient, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def single(mlflow_server, tiny_model_dir, tiny_data_file):
    """One process, batch 4: the reference every distributed run is compared with."""
    experiment = f"single-{uuid.uuid4().hex[:8]}"
    settings = {"model": tiny_model_dir, "data": tiny_data_file, "batch_size": 4, **TINY}
    done = _train([sys.executable], mlflow_server, experiment, settings)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs_of(MlflowClient(mlflow_server), experiment)
    return run


def test_accelerate_launch_two_processes_is_one_run_matching_one_process(
    single, mlflow_server, tiny_model_dir, tiny_data_file
):
    client = MlflowClient(mlflow_server)
    experiment = f"ddp-{uuid.uuid4().hex[:8]}"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    settings = {"model": tiny_model_dir, "data": tiny_data_file, "batch_size": 2, **TINY}
    done = _train(launch, mlflow_server, experiment, settings)
    assert done.returncode == 0, done.stderr[-3000:]

    (run,) = runs_of(client, experiment)  # rank 1 logged nothing of its own
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert (params["num_processes"], params["world_size"], params["global_batch_size"]) == ("2", "2", "4")
    assert single.data.params["num_processes"] == "1" and "world_size" not in single.data.params
    assert single.data.params["global_batch_size"] == "4"
    assert run.data.tags["config_hash"] != single.data.tags["config_hash"]  # 2 x 2 is not the same run as 1 x 4
    assert _losses(client, run.info.run_id) == pytest.approx(_losses(client, single.info.run_id), rel=1e-4)
    assert metrics["eval/loss"] == pytest.approx(single.data.metrics["eval/loss"], rel=1e-4)
    # memory per process (per device on GPUs); peak_mb is the largest of them
    per_rank = [metrics["memory/rank_0/peak_mb"], metrics["memory/rank_1/peak_mb"]]
    assert all(mb > 100 for mb in per_rank) and metrics["memory/peak_mb"] == max(per_rank)
    whole_mb = single.data.metrics["params/total"] * 4 / 2**20  # fp32: DDP keeps every weight on every rank
    assert metrics["memory/rank_1/params_mb"] == pytest.approx(whole_mb, rel=0.02)
    # tokens/s counts both processes' tokens: the run trained as many tokens as the single one
    assert metrics["train/tokens"] == single.data.metrics["train/tokens"]
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts


def test_mlflow_run_with_num_processes_relaunches_under_accelerate(
    single, mlflow_server, tiny_model_dir, tiny_data_file
):
    """-P num_processes=2 with batch 1 x grad_accum 2: global batch 4 again, one MLflow run, the same losses."""
    client = MlflowClient(mlflow_server)
    experiment = f"ddp-run-{uuid.uuid4().hex[:8]}"
    settings = {"model": tiny_model_dir, "data": tiny_data_file, "batch_size": 1, "grad_accum": 2, **TINY}
    done = mlflow_run(mlflow_server, experiment, {**settings, "num_processes": 2})
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs_of(client, experiment)
    assert run.info.status == "FINISHED" and run.data.params["global_batch_size"] == "4"
    assert _losses(client, run.info.run_id) == pytest.approx(_losses(client, single.info.run_id), rel=1e-4)


def test_a_failing_launch_leaves_its_run_failed_with_one_error_line(mlflow_server, tiny_model_dir, tiny_data_file):
    client = MlflowClient(mlflow_server)
    experiment = f"ddp-bad-{uuid.uuid4().hex[:8]}"
    settings = {"model": tiny_model_dir, "data": tiny_data_file, "batch_size": 500, "num_processes": 2, **TINY}
    done = _train([sys.executable], mlflow_server, experiment, settings)
    assert done.returncode != 0
    assert "error: batch_size=500 x 2 process(es) is larger than the" in done.stderr
    assert "error: num_processes=2: the distributed training failed (rank 0: exit status" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    (run,) = runs_of(client, experiment)
    assert run.info.status == "FAILED" and "batch_size=500" in run.data.tags["error"]


def test_fsdp_over_two_processes_matches_one_process_and_saves_the_adapter_only(
    single, mlflow_server, tiny_model_dir, tiny_data_file
):
    """-P num_processes=2 -P sharding=fsdp (train relaunches itself): each rank holds half of every weight, the
    losses are one process's with the same global batch, and the adapter rank 0 saves is the adapter alone."""
    client = MlflowClient(mlflow_server)
    experiment = f"fsdp-{uuid.uuid4().hex[:8]}"
    settings = {"model": tiny_model_dir, "data": tiny_data_file, "batch_size": 2, **TINY}
    done = _train([sys.executable], mlflow_server, experiment, {**settings, "num_processes": 2, "sharding": "fsdp"})
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs_of(client, experiment)
    params, metrics = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert (params["sharding"], params["world_size"], params["global_batch_size"]) == ("fsdp", "2", "4")
    assert run.data.tags["config_hash"] != single.data.tags["config_hash"]
    assert _losses(client, run.info.run_id) == pytest.approx(_losses(client, single.info.run_id), rel=1e-4)
    assert metrics["eval/loss"] == pytest.approx(single.data.metrics["eval/loss"], rel=1e-4)
    per_rank = [metrics["memory/rank_0/peak_mb"], metrics["memory/rank_1/peak_mb"]]
    assert all(mb > 100 for mb in per_rank) and metrics["memory/peak_mb"] == max(per_rank)
    # each rank holds half of every weight (the tiny Llama in fp32: 2 layers, 49k x 64 tied embeddings, ~13 MB)
    whole_mb = single.data.metrics["params/total"] * 4 / 2**20
    for rank in (0, 1):
        assert metrics[f"memory/rank_{rank}/params_mb"] == pytest.approx(whole_mb / 2, rel=0.02)
    adapter = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter and "adapter/model.safetensors" not in adapter
    assert metrics["adapter/size_mb"] == single.data.metrics["adapter/size_mb"] < whole_mb / 10
