"""One training over 2 processes (DDP, gloo on the CPU) against one process with the same global batch.

Launched the way a user launches it: `accelerate launch` directly, and `mlflow run -P num_processes=2` (train
relaunches itself under accelerate). fp32 and dropout 0, so the two must agree to float rounding, not statistically.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import torch
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
    """--num_processes 2 --sharding fsdp (train relaunches itself), batch 1 x grad_accum 2 (the first micro-batch
    without reduce-scatter): each rank holds half of every weight, the losses are one process's with the same
    global batch, and the adapter rank 0 saves is the adapter alone."""
    client = MlflowClient(mlflow_server)
    experiment = f"fsdp-{uuid.uuid4().hex[:8]}"
    settings = {"model": tiny_model_dir, "data": tiny_data_file, "batch_size": 1, "grad_accum": 2, **TINY}
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


@pytest.mark.soak
def test_fsdp_shards_a_4bit_base_and_matches_one_process(mlflow_server, tiny_model_dir, tiny_data_file):
    """QLoRA under FSDP: nf4 weights packed in bf16 tensors (bnb_4bit_quant_storage) so FSDP shards them, over 2
    gloo processes against one nf4 process (~80 s here: `make soak`). Both compute in bf16, where a batch of 4
    and two of 2 round differently: measured 6e-5 apart at most (2026-12-02), so 1e-3 is the tolerance."""
    client = MlflowClient(mlflow_server)
    runs = {}
    sharded = {"batch_size": 2, "num_processes": 2, "sharding": "fsdp"}
    for name, extra in (("one", {"batch_size": 4}), ("fsdp", sharded)):
        experiment = f"nf4-{name}-{uuid.uuid4().hex[:8]}"
        settings = {"model": tiny_model_dir, "data": tiny_data_file, **TINY, "quantization": "nf4", **extra}
        done = _train([sys.executable], mlflow_server, experiment, {**settings, "device": "auto"})
        assert done.returncode == 0, done.stderr[-3000:]
        (runs[name],) = runs_of(client, experiment)
    one, fsdp = runs["one"], runs["fsdp"]
    assert fsdp.info.status == "FINISHED" and fsdp.data.params["sharding"] == "fsdp"
    assert _losses(client, fsdp.info.run_id) == pytest.approx(_losses(client, one.info.run_id), rel=1e-3)
    assert fsdp.data.metrics["eval/loss"] == pytest.approx(one.data.metrics["eval/loss"], rel=1e-3)
    # each rank holds half of the packed 4-bit base and of the adapter (memory/model_mb: the whole, LoRA included)
    for rank in (0, 1):
        assert fsdp.data.metrics[f"memory/rank_{rank}/params_mb"] * 2 == pytest.approx(
            one.data.metrics["memory/model_mb"], rel=0.01
        )


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over NCCL needs 2 GPUs (one rank per GPU)")
@pytest.mark.parametrize("quantization", ["nf4", "bf16"])
def test_fsdp_on_two_gpus_matches_one_gpu(mlflow_server, tiny_model_dir, tiny_data_file, quantization):
    """The CUDA path of sharding=fsdp (NCCL, NVML memory per rank); bf16 compute on both sides, so 1e-3."""
    client = MlflowClient(mlflow_server)
    runs = {}
    sharded = {"batch_size": 2, "num_processes": 2, "sharding": "fsdp"}
    for name, extra in (("one", {"batch_size": 4}), ("fsdp", sharded)):
        experiment = f"gpu-{name}-{uuid.uuid4().hex[:8]}"
        settings = {"model": tiny_model_dir, "data": tiny_data_file, **TINY, "quantization": quantization, **extra}
        done = _train([sys.executable], mlflow_server, experiment, {**settings, "device": "cuda"})
        assert done.returncode == 0, done.stderr[-3000:]
        (runs[name],) = runs_of(client, experiment)
    one, fsdp = runs["one"], runs["fsdp"]
    assert _losses(client, fsdp.info.run_id) == pytest.approx(_losses(client, one.info.run_id), rel=1e-3)
    assert fsdp.data.tags["memory_source"] == one.data.tags["memory_source"] != "rss"
    for rank in (0, 1):
        assert fsdp.data.metrics[f"memory/rank_{rank}/params_mb"] * 2 == pytest.approx(
            one.data.metrics["memory/model_mb"], rel=0.01
        )
