"""config_hash and sweep_key of runs already in users' stores must not change: values recorded on main at 13e13d7
(before settings became groups), recomputed here from the same settings."""

from __future__ import annotations

import pytest

from lora_efficiency.config import TrainConfig, build_config, read_defaults
from lora_efficiency.configuration import config_hash, sweep_key
from lora_efficiency.sweep import load_sweep

FINGERPRINT = "0123456789abcdef"


def _resolved(cfg: TrainConfig, world_size: int = 1) -> dict:
    """What trainer.describe_run hashes, with fixed stand-ins for what a run finds when it starts."""
    flat = {k: v for k, v in cfg.flat().items() if k not in ("device", "num_processes")}
    resolved = {
        **flat,
        "device_resolved": "cpu",
        "target_modules_resolved": "k_proj,o_proj,q_proj,v_proj",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "base_model_revision": "abc123",
        "data_name": "bundled-instruct",
        "data_fingerprint": FINGERPRINT,
    }
    return {**resolved, "world_size": world_size} if world_size > 1 else resolved


def _train(**over) -> TrainConfig:
    return build_config(TrainConfig, {**read_defaults("train"), **over})


CASES = {
    "default": (lambda: _train(), 1),
    "sweep file": (lambda: load_sweep("configs/sweeps/modules.yaml").children[1].config, 1),  # q_v, seed 1
    "fsdp, 2 processes": (
        lambda: _train(
            rank=64,
            alpha=128.0,
            lr=1e-3,
            target_modules="all_linear",
            quantization="bf16",
            use_rslora=True,
            packing=False,
            num_processes=2,
            sharding="fsdp",
            seed=7,
            device="cpu",
        ),
        2,
    ),
    "full fine-tuning": (lambda: _train(method="full", quantization="bf16"), 1),
}
# name -> (config_hash, sweep_key, sweep_key of a local model folder), computed on 13e13d7
RECORDED = {
    "default": ("2068746b4f4834ba", "8013bc73ab55676d", "22b52ae82fa89516"),
    "sweep file": ("46a9465fbb6bc6b4", "da822d8e264b4abe", "8dd28f4062edccde"),
    "fsdp, 2 processes": ("d2fc87f80ad48a75", "8fb000ef5ceab15f", "04507c9781c9a450"),
    "full fine-tuning": ("a0fa6db4829b0f1c", "1f8df10563d37633", "4186255136b05159"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hashes_and_keys_of_stored_runs_do_not_change(name):
    make, world_size = CASES[name]
    cfg = make()
    assert (
        config_hash(_resolved(cfg, world_size)),
        sweep_key(cfg, FINGERPRINT),
        sweep_key(cfg, FINGERPRINT, "local-1234"),
    ) == RECORDED[name]
