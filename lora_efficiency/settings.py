"""The train settings as typed groups: each field with its one-line meaning, each group with what it shapes.

A group says which identities its fields enter (lora_efficiency.configuration derives config_hash, sweep_key and
the report's comparisons from these groups). TrainConfig holds one of each (cfg.adapter) and reads flat too
(cfg.rank, as a sweep file's `rank:` and the flag --rank name it); every setting is declared here, in its group,
and nowhere else, with the checks of its value (`checks()`). Defaults live in configs/default.yaml.

This module imports nothing but the standard library: whatever reads settings (the report, a Ray worker) can.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints


def setting(meaning: str) -> Any:
    """A field and its one-line meaning (shown by --help)."""
    return dataclasses.field(metadata={"help": meaning})


# One check of one setting: (its name, whether a converted value is allowed, what is allowed). Each group lists
# its own (`checks()`); lora_efficiency.config.train_problems applies them to every value that converted, before
# anything loads, and names each failure `name=value is invalid: <allowed>`, all of them in one error. Checks of
# one setting against another's value, against the names of lora_efficiency.names (models, data sets,
# quantizations, module presets) or against files and runs stay there.
Check = tuple[str, Callable[[Any], bool], str]

SEED_MAX = 2**32 - 1  # torch.manual_seed overflows above 2^64-1; numpy's and most samplers' seeds stop at 2^32-1
ALPHA_MAX = 65536.0  # alpha / r scales the update: 1e300 turns every bf16 activation into inf
DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")  # torch.device() overflows on an index of 20 digits
METHODS = ("lora", "full")  # full: every weight of the base trains (the reference LoRA is measured against)
ATTENTIONS = ("auto", "per_example", "sdpa")  # attention.py; auto: per_example where the architecture allows it
SHARDINGS = ("none", "fsdp")  # none: DDP (a full copy of the base per process); fsdp: torch FSDP2 (distributed.py)


@dataclass(frozen=True)
class ModelData:
    """What trains on what, as named: enters the identities by content (base model revision, data fingerprint)."""

    model: str = setting("bundled smollm2-135m, a local Hugging Face folder, or a hub id")
    data: str = setting("'' (the bundled set), a set name, a data file, a prepared folder or a prepare run id")

    @staticmethod
    def checks() -> tuple[Check, ...]:
        return ()  # names, folders and runs: lora_efficiency.config checks them (names.py, the file system)


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

    @staticmethod
    def checks() -> tuple[Check, ...]:
        return (
            ("method", lambda x: x in METHODS, f"one of {', '.join(METHODS)}"),
            ("rank", lambda x: x >= 1, "an integer >= 1"),
            ("rank", lambda x: x < 1 or x <= 4096, "an integer from 1 to 4096"),
            ("alpha", lambda x: 0 < x <= ALPHA_MAX, f"a number in (0, {ALPHA_MAX:g}]"),
            ("dropout", lambda x: 0 <= x < 1, "a number in [0, 1)"),
        )


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

    @staticmethod
    def checks() -> tuple[Check, ...]:
        return (
            *((name, lambda x: x >= 1, "an integer >= 1") for name in ("max_steps", "batch_size", "grad_accum")),
            ("lr", lambda x: 0 < x < 1, "a number in (0, 1)"),
            ("warmup_ratio", lambda x: 0 <= x < 1, "a number in [0, 1)"),
            ("weight_decay", lambda x: 0 <= x <= 100, "a number from 0 to 100"),
            ("max_grad_norm", lambda x: x > 0, "a number > 0"),
            ("seq_len", lambda x: 16 <= x <= 131072, "an integer from 16 to 131072"),
        )


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

    @staticmethod
    def checks() -> tuple[Check, ...]:
        return (
            *((name, lambda x: x >= 1, "an integer >= 1") for name in ("eval_samples", "eval_batch_size")),
            ("generate_samples", lambda x: x >= 0, "an integer >= 0 (0: no exact match)"),
            ("max_new_tokens", lambda x: x >= 1, "an integer >= 1"),
            ("exact_match", lambda x: x in ("auto", "true", "false"), "auto, true or false"),
            ("forget_samples", lambda x: 0 <= x <= 256, "an integer from 0 (no forgetting measured) to 256 passages"),
        )


@dataclass(frozen=True)
class Validation:
    """What is watched while training: never changes the weights (no_grad, eval mode, no random numbers), so it
    enters no identity."""

    eval_every: int = setting("steps between validation losses (0: none; the last step always has one)")
    val_samples: int = setting("validation examples: the last val_samples of the held-out split")
    converge_tol: float = setting("converged = val loss fell by less than this share over the last half")

    @staticmethod
    def checks() -> tuple[Check, ...]:
        return (
            ("eval_every", lambda x: x >= 0, "an integer >= 0 (0: no validation curve)"),
            ("val_samples", lambda x: x >= 1, "an integer >= 1"),
            ("converge_tol", lambda x: 0 < x < 1, "a number in (0, 1): the relative improvement that still counts"),
        )


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

    @staticmethod
    def checks() -> tuple[Check, ...]:
        return (
            ("seed", lambda x: 0 <= x <= SEED_MAX, f"an integer from 0 to {SEED_MAX}"),
            ("device", DEVICE.fullmatch, "auto, cpu, cuda or cuda:N"),
            ("attention", lambda x: x in ATTENTIONS, f"one of {', '.join(ATTENTIONS)}"),
            ("checkpoint_every", lambda x: x >= 0, "an integer >= 0 (0: no checkpoints)"),
            (
                "num_processes",
                lambda x: 1 <= x <= 256,
                "an integer from 1 to 256 (1: this process; N: N DDP processes, one per GPU)",
            ),
            ("sharding", lambda x: x in SHARDINGS, f"one of {', '.join(SHARDINGS)}"),
        )


# The group of each part of a settings file (`train: {adapter: {rank: 16, ...}, ...}`), in field order; also
# TrainConfig's fields, by the same names
GROUPS: dict[str, type] = {
    "model_data": ModelData,
    "adapter": Adapter,
    "optimization": Optimization,
    "evaluation": Evaluation,
    "validation": Validation,
    "compute": Compute,
}
# setting name -> the TrainConfig field (group) that holds it: each name is in exactly one group
_GROUP_OF = {f.name: key for key, group in GROUPS.items() for f in dataclasses.fields(group)}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run: one field per group (no dataclass over 16 fields). Built from flat values
    (`TrainConfig.from_flat`), read flat (`cfg.rank`), changed flat (`cfg.replace(rank=8)`), written flat
    (`cfg.flat()`). A new setting goes into its group, never here."""

    model_data: ModelData
    adapter: Adapter
    optimization: Optimization
    evaluation: Evaluation
    validation: Validation
    compute: Compute

    # Flat reads (cfg.rank for cfg.adapter.rank): ~250 call sites read cfg.<name>, and a setting's name is flat
    # wherever a person writes it (the flag --rank, a sweep file's `rank:`, a run's params), which holds because
    # each name is in exactly one group. Python calls this only when normal lookup fails, so reading a group costs
    # nothing extra; an unknown name (pickle's probe for __setstate__ too) is an AttributeError, as on any object.
    def __getattr__(self, name: str) -> Any:
        key = _GROUP_OF.get(name)
        if key is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(object.__getattribute__(self, key), name)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A TrainConfig from every setting by name, unchecked (lora_efficiency.config.build_config checks)."""
        return from_flat(cls, values)

    def flat(self) -> dict[str, Any]:
        """Every setting by name, in field order (ModelData's first, Compute's last): params, hashes, files."""
        return {name: getattr(getattr(self, key), name) for name, key in _GROUP_OF.items()}

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some settings changed, by name (as dataclasses.replace: unchecked)."""
        if unknown := sorted(set(changes) - _GROUP_OF.keys()):
            raise TypeError(f"TrainConfig has no setting {', '.join(unknown)}")
        by_group: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            by_group.setdefault(_GROUP_OF[name], {})[name] = value
        return dataclasses.replace(
            self, **{key: dataclasses.replace(getattr(self, key), **v) for key, v in by_group.items()}
        )


@functools.cache
def setting_fields(cls: type) -> tuple[tuple[dataclasses.Field, type], ...]:
    """The settings a class takes by name, with their types: a field whose type is a group (TrainConfig's) stands
    for its group's fields. What parsing, --help and MLproject list."""
    hints = get_type_hints(cls)
    out: list[tuple[dataclasses.Field, type]] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        out.extend(setting_fields(kind) if dataclasses.is_dataclass(kind) else [(f, kind)])
    return tuple(out)


def from_flat(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of `cls` from its settings by name (setting_fields), each group built from its own."""
    hints = get_type_hints(cls)
    return cls(
        **{
            f.name: from_flat(hints[f.name], values) if dataclasses.is_dataclass(hints[f.name]) else values[f.name]
            for f in dataclasses.fields(cls)
        }
    )


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
