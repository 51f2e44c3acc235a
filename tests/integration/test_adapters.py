"""Adapter folders that load anywhere: the base by its hub id (the bundled one through the HF cache, offline),
the tokenizer beside the adapter, a ModelCard, push to the hub up to the call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_efficiency.adapters import push_adapter, save_adapter, write_model_card
from lora_efficiency.models import (
    BUNDLED_HUB_ID,
    bundled_model_path,
    load_base_model,
    load_tokenizer,
    register_in_hub_cache,
    resolve_model,
)
from tests.conftest import subprocess_env

LOAD = """
import json, sys
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
lora_b = sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
from huggingface_hub import try_to_load_from_cache
cached = try_to_load_from_cache(model.base_model.model.name_or_path, "model.safetensors")
print(json.dumps({"base": model.base_model.model.name_or_path, "cached": cached, "lora_b": lora_b}))
"""


@pytest.fixture
def private_caches(tmp_path, monkeypatch):
    """This project's cache holding the bundled model (hard links to the machine's copy: no 260 MB copy) and a
    Hugging Face hub cache, both in tmp_path, so the test can rename the first without touching the machine's."""
    from huggingface_hub import constants

    machine = bundled_model_path()
    project = tmp_path / "project-cache"
    (project / "models" / machine.name).mkdir(parents=True)
    for f in machine.iterdir():
        os.link(f, project / "models" / machine.name / f.name)
    hub = tmp_path / "hub"
    monkeypatch.setenv("LORA_EFFICIENCY_CACHE", str(project))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return project, hub


def _bundled_adapter(folder):
    """A LoRA adapter on the bundled base, its lora_B weights set to 0.01 (so loading them is visible)."""
    from peft import LoraConfig, get_peft_model

    source = resolve_model("smollm2-135m")
    base = load_base_model(source, quantization="bf16", double_quant=False, device=torch.device("cpu"))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    save_adapter(model, load_tokenizer(source), folder, source=source)
    return source, model


def test_an_adapter_on_the_bundled_base_loads_by_hub_id_after_the_cache_moved(private_caches, tmp_path):
    project, hub = private_caches
    folder = tmp_path / "adapter"
    _, model = _bundled_adapter(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BUNDLED_HUB_ID  # not this machine's cache path
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "base_model.json"} <= {
        f.name for f in folder.iterdir()
    }
    assert json.loads((folder / "base_model.json").read_text())["base_gguf_type"] == "Q4_1"
    expected = sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    project.rename(tmp_path / "moved")  # the converted folder is gone from where it was
    env = subprocess_env(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", LORA_EFFICIENCY_CACHE=str(tmp_path / "none"))
    proc = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    # the base came from the HF cache's snapshot of the bundled model (named after its GGUF's sha256)
    snapshots = hub / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots"
    assert loaded["base"] == BUNDLED_HUB_ID and [p.name for p in snapshots.iterdir()] == [
        Path(loaded["cached"]).parent.name
    ]
    assert loaded["lora_b"] == pytest.approx(expected, rel=1e-3)


def test_the_hub_cache_entry_never_replaces_a_real_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "source.json").write_text(json.dumps({"sha256": "ab" * 32, "file": "x.Q4_1.gguf"}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c" * 40)  # a real download's commit
    snapshot = register_in_hub_cache(folder, "org/name")
    assert snapshot == repo / "snapshots" / ("ab" * 20)
    assert (snapshot / "config.json").read_text() == "{}" and (snapshot / "source.json").is_file()
    assert (repo / "refs" / "main").read_text() == "c" * 40
    (repo / "refs" / "main").unlink()
    register_in_hub_cache(folder, "org/name")
    assert (repo / "refs" / "main").read_text() == "ab" * 20


def test_the_model_card_says_base_data_settings_metrics_and_command(private_caches, tmp_path):
    from huggingface_hub import ModelCard

    folder = tmp_path / "adapter"
    _bundled_adapter(folder)
    write_model_card(
        folder,
        settings={"rank": 2, "quantization": "nf4", "lr": 0.0002},
        metrics={"eval/loss": 1.25, "eval/exact_match": 0.5},
        data={"dataset": "bundled-instruct", "fingerprint": "0123abcd"},
        command="python -m entrypoints.train --rank 2",
        run_id="abc123",
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == BUNDLED_HUB_ID and card.data.library_name == "peft"
    assert "quantization-nf4" in card.data.tags
    text = card.text
    for expected in (
        "Q4_1",
        "| `rank` | 2 |",
        "| `eval/loss` | 1.25 |",
        "| `fingerprint` | 0123abcd |",
        "python -m entrypoints.train --rank 2",
        "abc123",
    ):
        assert expected in text, expected
    assert "More Information Needed" not in text  # peft's template is replaced


def test_push_adapter_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return type("Commit", (), {"commit_url": "https://huggingface.co/me/adapter/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_adapter(tmp_path, "me/adapter", token="hf_x")
    assert url.endswith("/commit/1")
    assert calls[0] == ("init", "hf_x")
    assert calls[1] == ("create_repo", "me/adapter", {"private": True, "exist_ok": True})
    assert calls[2][1]["folder_path"] == str(tmp_path) and calls[2][1]["repo_id"] == "me/adapter"
