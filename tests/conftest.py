"""Shared fixtures: tiny randomly initialised models with the real SmolLM2 tokenizer, small data, MLflow stores."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from lora_efficiency.data import bundled_instruct
from lora_efficiency.models import bundled_model_path

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Prepared data goes to a cache of this test session (subprocesses inherit it); the converted bundled model
    (~20 s to build) is shared with the machine's cache through a link."""
    machine_models = bundled_model_path().parent
    cache = tmp_path_factory.mktemp("cache")
    (cache / "models").symlink_to(machine_models, target_is_directory=True)
    # datasets copies every local file it loads into HF_DATASETS_CACHE: keep that inside the session too
    settings = {"LORA_EFFICIENCY_CACHE": str(cache), "HF_DATASETS_CACHE": str(cache / "hf-datasets")}
    previous = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield cache
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tokenizer_dir(isolated_cache) -> Path:
    """The bundled SmolLM2 folder (converted from its GGUF once per machine, ~20 s): its real tokenizer."""
    return bundled_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer and chat template, saved as a HF folder (~13 MB).

    initializer_range 0.2 (not 0.02) makes its attention depend on context, so a test can tell apart a packed
    row whose examples see each other from one whose examples are isolated.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)), dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_scaled_logits_dir(tmp_path_factory, tokenizer_dir, kind: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, GraniteConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    llama = tiny_llama_config(len(tokenizer)).to_dict()
    shape = {k: llama[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    shape |= {k: llama[k] for k in ("num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
    shape |= {"tie_word_embeddings": True, "initializer_range": 0.2}
    if kind == "granite":
        config = GraniteConfig(**shape, logits_scaling=4.0)
    else:
        config = Gemma2Config(**shape, head_dim=16, final_logit_softcapping=2.0, sliding_window=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder = tmp_path_factory.mktemp(f"tiny-{kind}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_granite_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny Llama's shape as a Granite, whose logits are divided by logits_scaling (4, not 1): a model whose
    loss is wrong if computed as lm_head(hidden)."""
    return _tiny_scaled_logits_dir(tmp_path_factory, tokenizer_dir, "granite")


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny Llama's shape as a Gemma-2, whose logits are soft-capped at final_logit_softcapping (2)."""
    return _tiny_scaled_logits_dir(tmp_path_factory, tokenizer_dir, "gemma2")


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory) -> Path:
    """80 examples of the bundled set as a JSONL file (prompt, response, task); prepare splits off 8 for eval."""
    examples, _ = bundled_instruct(num_train=80, num_eval=0, seed=7)
    path = tmp_path_factory.mktemp("tiny-data") / "tiny.jsonl"
    lines = [json.dumps({"prompt": e.prompt, "response": e.response, "task": e.task}) for e in examples]
    path.write_text("\n".join(lines) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with an SQLite backend; stop() and start() keep the port and the file."""

    def __init__(self, root: Path, workers: int = 1):
        self.root, self.workers, self.port, self.proc = root, workers, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = root / "mlflow.db"

    def start(self) -> MlflowServer:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--workers",
            str(self.workers),
        ]
        self.log = open(self.root / "server.log", "a")  # noqa: SIM115 - written by the server until stop()
        # its own process group: stop() ends the server and its uvicorn workers together
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
        )
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start: {self.log_text()[-2000:]}") from None
                time.sleep(0.3)

    def stop(self, kill: bool = True) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=30)
            # uvicorn's workers are its children: wait until nothing answers on the port any more
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                    time.sleep(0.3)
                except OSError:
                    break
        if self.proc:
            self.log.close()

    def log_text(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, local artifacts) on 127.0.0.1; yields its URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server.uri
    server.stop(kill=False)


@pytest.fixture
def sqlite_tracking(tmp_path, monkeypatch) -> str:
    """An embedded SQLite store of this test alone, set as the tracking URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for entry points run as subprocesses: this venv's python first on PATH."""
    # mlflow.set_experiment() in an in-process test sets MLFLOW_EXPERIMENT_ID in os.environ: a subprocess that
    # inherited it would log to that experiment (and `mlflow run --experiment-name` refuses to start)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def mlflow_run(tracking_uri: str, experiment: str, params: dict, entry_point: str = "train", sampling_s: float = 1):
    """`mlflow run` of an entry point; MLflow's system metrics sampled every `sampling_s` and logged at once (a
    run shorter than one interval logs none)."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        entry_point,
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    env = subprocess_env(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=str(sampling_s),
        MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="1",
    )
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def runs_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def tiny_sweep_base(model_dir: Path, data_file: Path) -> dict:
    """A sweep file's base for the tiny model: 2 steps, 4 eval examples, 2 answers of 4 tokens (~10 s a child)."""
    return {
        "model": str(model_dir),
        "data": str(data_file),
        "max_steps": 2,
        "batch_size": 2,
        "seq_len": 256,
        "eval_samples": 4,
        "generate_samples": 2,
        "max_new_tokens": 4,
        "device": "cpu",
    }


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, not faked, on the CPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
