"""What both sides of the benchmark train: the LoRA recipe, the schedule, the base storages (modes) and the
random-weight models of a real model's shape that GPU tables use."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from lora_efficiency.config import BENCH_MODES
from lora_efficiency.models import bundled_model_path, cache_root, resolve_model

# dropout: the train default since 2026-12-03 (0; configs/sweeps/dropout.yaml); 0.05 before
RANK, ALPHA, DROPOUT, TARGET_MODULES = 16, 32.0, 0.0, "attention"
LR, WARMUP_RATIO, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 2e-4, 0.1, 0.0, 1.0, 0
MODES = BENCH_MODES  # config checks --modes against them; config may not import the benchmark
# Random-weight models of a real model's shape, for GPU tables (the weights do not change the speed). Their
# names are config.RANDOM_SHAPE_NAMES, which --model accepts (tests/unit/test_bench_parsing.py keeps them equal).
RANDOM_SHAPES = {
    "llama-3.2-1b-shape": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


def model_path(name: str) -> str:
    """What `--model name` trains: a RANDOM_SHAPES model's cached folder, else the name as given."""
    return str(random_model_path(name)) if name in RANDOM_SHAPES else name


def model_source(name: str):
    """models.ModelSource of `--model name` (a random shape included)."""
    return resolve_model(model_path(name))


def random_model_path(name: str) -> Path:
    """A RANDOM_SHAPES model with seeded random bf16 weights and SmolLM2's tokenizer, saved once in the cache."""
    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    config = LlamaConfig(
        **RANDOM_SHAPES[name],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".random-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # made concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
