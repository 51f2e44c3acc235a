"""The train settings as typed groups: each field with its one-line meaning, each group with what it shapes.

A group says which identities its fields enter (lora_efficiency.configuration derives config_hash, sweep_key and
the report's comparisons from these groups). TrainConfig is their union: one flat, frozen dataclass (cfg.rank, a
sweep file's `rank:`, the flag --rank), its fields declared here, by group, and nowhere else. Defaults live in
configs/default.yaml; the checks of each value sit in lora_efficiency.config.train_problems.

This module imports nothing but the standard library: whatever reads settings (the report, a Ray worker) can.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def setting(meaning: str) -> Any:
    """A field and its one-line meaning (shown by --help)."""
    return dataclasses.field(metadata={"help": meaning})


@dataclass(frozen=True)
class ModelData:
    """What trains on what, as named: enters the identities by content (base model revision, data fingerprint)."""

    model: str = setting("bundled smollm2-135m, a local Hugging Face folder, or a hub id")
    data: str = setting("'' (the bundled set), a set name, a data file, a prepared folder or a prepare run id")


@dataclass(frozen=True)
class Adapter:
    """What is trained on which base: shapes the adapter, so enters config_hash, sweep_key and the report."""

    method: str = setting("lora (adapters on a frozen base) or full (every weight trains)")
    rank: int = setting("LoRA rank r")
    alpha: float = setting("LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = setting("dropout on the LoRA input")
    target_modules: str = setting("a preset (q_v, attention, all_linear, ...) or a comma list of module names")
    quantization: str = setting("storage of the frozen base: nf4, fp4, int8, bf16, fp16 or fp32")
    double_quant: bool = setting("nf4/fp4: quantize the quantization constants too")
    use_rslora: bool = setting("rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = setting("weight-decomposed LoRA (DoRA)")


@dataclass(frozen=True)
class Optimization:
    """How it is trained and on which rows: shapes the adapter, so enters config_hash, sweep_key and the report."""

    max_steps: int = setting("optimizer steps")
    batch_size: int = setting("rows per micro-batch (a packed row holds several examples)")
    grad_accum: int = setting("micro-batches per optimizer step")
    lr: float = setting("peak learning rate (AdamW), cosine decay after warm-up")
    warmup_ratio: float = setting("share of max_steps spent warming up linearly")
    weight_decay: float = setting("AdamW's decoupled weight decay")
    max_grad_norm: float = setting("gradient clipping norm")
    seq_len: int = setting("tokens per row")
    packing: bool = setting("pack several examples per row (attention never crosses examples)")
    train_on_prompt: bool = setting("false: the loss covers response tokens only")
    gradient_checkpointing: bool = setting("recompute activations in the backward pass (less memory, more time)")


@dataclass(frozen=True)
class Evaluation:
    """The scoring after training: enters config_hash and sweep_key (a run scored on 300 examples is not one
    scored on 8); the report compares it through the eval_settings tag."""

    eval_samples: int = setting("held-out examples scored after training")
    eval_batch_size: int = setting("rows per evaluation batch")
    generate_samples: int = setting("held-out examples answered greedily for exact match (0: none)")
    max_new_tokens: int = setting("bound on each generated answer")
    exact_match: str = setting("auto (when the data has reference answers), true or false")
    forget_samples: int = setting("passages of general text (the Python reference) scored before and after (0: none)")


@dataclass(frozen=True)
class Validation:
    """What is watched while training: never changes the weights (no_grad, eval mode, no random numbers), so it
    enters no identity."""

    eval_every: int = setting("steps between validation losses (0: none; the last step always has one)")
    val_samples: int = setting("validation examples: the last val_samples of the held-out split")
    converge_tol: float = setting("converged = val loss fell by less than this share over the last half")


@dataclass(frozen=True)
class Compute:
    """How and where it runs: the seed tells seeds apart (sweep_key, not config_hash); num_processes and sharding
    enter when not single-process; the rest enters no identity."""

    seed: int = setting("seed of every random draw, 0 to 2^32-1")
    device: str = setting("auto (CUDA when there is one, else CPU), cpu, cuda or cuda:N")
    attention: str = setting("per_example, sdpa or auto (per_example where the architecture allows it)")
    compile: bool = setting("torch.compile each decoder layer (inductor) for training; false: eager")
    trust_remote_code: bool = setting("run code shipped with a hub model")
    checkpoint_every: int = setting("save a resumable checkpoint every N steps (0: never)")
    resume_from: str = setting("a train run's id (its latest checkpoint) or a checkpoint folder")
    num_processes: int = setting("1 to 256; N > 1: one DDP (or FSDP) training over N processes")
    sharding: str = setting("none (DDP) or fsdp (the base and adapter sharded over the processes)")


@dataclass(frozen=True)
class TrainConfig(Compute, Validation, Evaluation, Optimization, Adapter, ModelData):
    """Settings of one training run: the union of the groups (their fields in the order of GROUPS), read flat
    (cfg.rank). Declares no field of its own: a new setting goes into its group."""


# The group of each part of a settings file (`train: {adapter: {rank: 16, ...}, ...}`), in field order
GROUPS = {
    "model_data": ModelData,
    "adapter": Adapter,
    "optimization": Optimization,
    "evaluation": Evaluation,
    "validation": Validation,
    "compute": Compute,
}


def names(group: type) -> tuple[str, ...]:
    """The fields of one group, in order."""
    return tuple(f.name for f in dataclasses.fields(group))


def grouped(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A TrainConfig's flat values by group: how a settings file holds them."""
    return {key: {name: values[name] for name in names(group)} for key, group in GROUPS.items()}


def flattened(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The flat values of a settings file's `train` mapping, by group or flat (both are read), and the problems:
    a setting given twice, a group that is not a mapping. Unknown names stay in, for build_config to name."""
    flat: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        inner = value if key in GROUPS else {key: value}
        if not isinstance(inner, dict):
            problems.append(
                f"{key}={value!r} is invalid: a mapping of the group's settings ({', '.join(names(GROUPS[key]))})"
            )
            continue
        for name, v in inner.items():
            if name in flat:
                problems.append(f"{name} is given twice in the settings file")
            flat[name] = v
    return flat, problems
