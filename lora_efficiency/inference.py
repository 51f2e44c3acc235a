"""Base + adapter for inference: from a run's artifacts or a folder (safetensors only), generate, merge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import torch
from peft import PeftModel
from safetensors import SafetensorError

from lora_efficiency.errors import UserError
from lora_efficiency.evaluation import generate_answers
from lora_efficiency.models import (
    PICKLE_SUFFIXES,
    ModelSource,
    compute_dtype,
    load_base_model,
    load_tokenizer,
    resolve_model,
)


def check_adapter_folder(folder: str | Path) -> Path:
    """An adapter folder must hold adapter_config.json and adapter_model.safetensors; pickles are never loaded
    (unpickling runs arbitrary code)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(
            f"adapter={str(folder)!r} is not a folder: allowed are a folder with adapter_config.json "
            "and adapter_model.safetensors, or none"
        )
    if not (folder / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"it holds the pickle file {pickles[0]}, which is refused" if pickles else "it has none"
        raise UserError(
            f"adapter={str(folder)!r} needs adapter_model.safetensors: {found}; only safetensors adapters are loaded"
        )
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"adapter={str(folder)!r} has no adapter_config.json")
    return folder


def resolve_run_ref(ref: str) -> str:
    """The train run behind `ref`: a run id as given, runs:/<id>/<model name> or runs:/<id>/model (the run must have
    logged a model), or models:/<name>@<alias> / models:/<name>/<version> (the version's source run). A name, alias,
    version or model that does not exist is a UserError naming what does."""
    client = mlflow.MlflowClient()
    if ref.startswith("runs:/"):
        run_id, _, path = ref.removeprefix("runs:/").partition("/")
        path = path.strip("/") or "model"
        try:
            experiment_id = client.get_run(run_id).info.experiment_id
        except Exception:
            raise UserError(
                f"run_id={ref!r}: no run {run_id} in the tracking store {mlflow.get_tracking_uri()}"
            ) from None
        models = client.search_logged_models([experiment_id], filter_string=f"source_run_id='{run_id}'")
        names = sorted({m.name for m in models})
        # `model`, the name of every run's model before they were named after their configuration, is still the
        # documented way to say "this run's model" (runs:/<id>/model): any one model the run logged
        if path not in names and not (path == "model" and names):
            raise UserError(
                f"run_id={ref!r}: run {run_id} logged no model {path!r}; its models: {', '.join(names) or 'none'} "
                "(pass the run id alone to use its adapter artifact)"
            )
        return run_id
    if not ref.startswith("models:/"):
        return ref
    name, at, alias = ref.removeprefix("models:/").partition("@")
    name, _, version = name.partition("/") if not at else (name, "", "")
    try:
        registered = client.get_registered_model(name)
    except Exception:
        names = sorted(m.name for m in client.search_registered_models())
        raise UserError(
            f"run_id={ref!r}: no registered model {name!r}; registered models: {', '.join(names) or 'none'}"
        ) from None
    try:
        found = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, version)
    except Exception:
        if at:
            aliases = ", ".join(f"{a} (version {v})" for a, v in sorted(registered.aliases.items()))
            raise UserError(
                f"run_id={ref!r}: {name!r} has no alias {alias!r}; its aliases: {aliases or 'none'}"
            ) from None
        versions = ", ".join(
            str(v) for v in sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        )
        raise UserError(
            f"run_id={ref!r}: {name!r} has no version {version}; its versions: {versions or 'none'}"
        ) from None
    if not found.run_id:
        raise UserError(f"run_id={ref!r}: version {found.version} of {name!r} names no source run")
    return found.run_id


def train_run(run_id: str):
    """The MLflow run `run_id`, which must exist and carry an adapter artifact."""
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception:
        raise UserError(f"run_id={run_id!r} does not exist in the tracking store {mlflow.get_tracking_uri()}") from None
    if run.data.params.get("method") == "full":
        raise UserError(
            f"run_id={run_id!r} is a full fine-tuning run (method=full): its weights are not logged, so it has no "
            "adapter to load; its metrics are the study's reference"
        )
    if not client.list_artifacts(run_id, "adapter"):
        raise UserError(f"run_id={run_id!r} has no adapter artifact: pass the id of a finished train run")
    return run


def download_adapter(run_id: str) -> Path:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download clutters logs

    return check_adapter_folder(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter"))


def load_for_inference(
    *,
    model: str | ModelSource,
    adapter: str | Path | None,
    quantization: str,
    device: torch.device,
    double_quant: bool = True,
    trust_remote_code: bool = False,
):
    """(model with the adapter attached, or the bare base if adapter is None; tokenizer; model source)."""
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    base = load_base_model(
        source, quantization=quantization, double_quant=double_quant, device=device, trust_remote_code=trust_remote_code
    )
    if adapter is None:
        return base, tokenizer, source

    folder = check_adapter_folder(adapter)
    try:
        return PeftModel.from_pretrained(base, str(folder)), tokenizer, source
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:  # corrupt safetensors or config
        raise UserError(
            f"adapter={str(folder)!r} could not be loaded: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from None


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 128, device: torch.device | None = None) -> str:
    """Greedy answer to one prompt, formatted with the model's chat template."""
    device = device or next(model.parameters()).device
    dtype = None if next(model.parameters()).dtype == torch.float32 else compute_dtype(device)
    answers, _ = generate_answers(
        model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1, device=device, autocast_dtype=dtype
    )
    return answers[0]


def merge(*, model: str | ModelSource, adapter: str | Path, output_dir: str | Path, dtype: str = "bf16") -> Path:
    """Write base + adapter merged into one model folder (safetensors). Only unquantized bases merge exactly:
    merging into nf4/int8 weights would round the update away, so dtype is bf16, fp16 or fp32."""
    if dtype not in ("bf16", "fp16", "fp32"):
        raise UserError(f"dtype={dtype!r} is invalid: merge writes bf16, fp16 or fp32 weights")
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"output={str(output)!r} exists and is not empty: choose a new folder")
    peft_model, tokenizer, _ = load_for_inference(
        model=model, adapter=adapter, quantization=dtype, device=torch.device("cpu")
    )
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    (output / "merged_from.json").write_text(json.dumps({"adapter": str(adapter), "dtype": dtype}, indent=2))
    return output
