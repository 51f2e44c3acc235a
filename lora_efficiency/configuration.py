"""What a configuration is: the one place that says which settings make two runs "the same configuration".

Every train setting is in exactly one group of lora_efficiency.settings (TrainConfig is their union); the groups
below are derived from those. Three identities are derived from the groups, each for its own question:

- config_hash (tag of every train run): which runs are seeds of one configuration. The adapter's settings, the
  evaluation's, and model and data by content (hub id + revision, data fingerprint), not by how they were named.
- sweep_key (tag of every sweep child): has this exact child already FINISHED, so a restarted sweep skips it.
  Like config_hash plus the seed and the model as named (a child is re-run when its model reference changes).
- REPORT_SETTINGS: the params the report labels and compares configurations by (the adapter's settings and
  model and data by content; evaluation settings are compared separately through the eval_settings tag).

The planner's inputs (PLANNER_SETTINGS) are the settings the memory planner needs from a configuration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from lora_efficiency.settings import (
    Adapter,
    Compute,
    Evaluation,
    ModelData,
    Optimization,
    TrainConfig,
    Validation,
    names,
)

# The identity groups, derived from the settings' groups (lora_efficiency.settings says what each one shapes).
# What shapes the trained adapter: its method, the base's storage, the optimisation and the data layout.
ADAPTER_SETTINGS = names(Adapter) + names(Optimization)
# What shapes the evaluation after training (a run scored on 300 examples is not compared with one scored on 8).
EVAL_SETTINGS = names(Evaluation)
# What is watched while training (the validation curve and its convergence test): it never changes the weights
# (evaluation runs under no_grad in eval mode and draws no random numbers), so it enters no identity.
MONITOR_SETTINGS = names(Validation)
# Model and data as named, and how and where a run ran: enter identities by content or not at all.
NAME_SETTINGS = names(ModelData)
RUN_SETTINGS = names(Compute)
TRAIN_SETTINGS = ADAPTER_SETTINGS + EVAL_SETTINGS + MONITOR_SETTINGS + NAME_SETTINGS + RUN_SETTINGS

# Found when a run starts (logged as params beside the settings).
RESOLVED = ("target_modules_resolved", "base_model", "base_model_revision", "data_name", "data_fingerprint")

# world_size and sharding: a run over 2 processes (or sharded) is not merged with one that is not (the same
# global batch gives the same loss within float rounding, but memory per device and speed differ)
REPORT_SETTINGS = (*ADAPTER_SETTINGS, "world_size", "sharding", "base_model", "data_fingerprint")
PLANNER_SETTINGS = (
    "rank",
    "target_modules",
    "quantization",
    "double_quant",
    "batch_size",
    "seq_len",
    "gradient_checkpointing",
    "dropout",
)

# Out of config_hash: seeds must group; names, device, checkpointing, how attention is computed (the same
# arithmetic, per example or masked over the row) and whether the layers are compiled (the same arithmetic, fused:
# tests/integration/test_trainer.py pins the loss) do not change the adapter.
_NOT_IN_CONFIG_HASH = (
    "seed",
    "device",
    "attention",
    "compile",
    "device_resolved",
    "data",
    "model",
    "checkpoint_every",
    "resume_from",
    *MONITOR_SETTINGS,
)
# Out of sweep_key: the data enters by fingerprint; device, checkpointing and monitoring do not change the child.
_NOT_IN_SWEEP_KEY = ("device", "attention", "compile", "data", "checkpoint_every", "resume_from", *MONITOR_SETTINGS)
# Settings added after runs were stored: they enter an identity only when not at their default, so the hashes
# and keys of earlier runs (all of them LoRA, none sharded) stay valid.
_ONLY_WHEN_SET = {"method": "lora", "sharding": "none", "forget_samples": 16}


def _identity(settings: Mapping[str, Any], leave_out: tuple[str, ...]) -> dict[str, Any]:
    return {
        k: v for k, v in settings.items() if k not in leave_out and not (k in _ONLY_WHEN_SET and v == _ONLY_WHEN_SET[k])
    }


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(resolved: Mapping[str, Any]) -> str:
    """Hash of a run's resolved settings (the train settings plus RESOLVED, world_size only when > 1): the same
    for every seed of a configuration and on every machine."""
    return _digest(_identity(resolved, _NOT_IN_CONFIG_HASH))


def sweep_key(settings: Any, data_fingerprint: str, model_revision: str = "") -> str:
    """What identifies one sweep child across restarts: its train settings (a TrainConfig, or its fields as a dict),
    the data's fingerprint and, for a local model folder, its content revision (`models.local_revision`: other
    weights under the same folder name are another child). num_processes enters only when > 1 and the revision
    only when there is one, so keys made before either existed (hub and bundled models) stay valid."""
    settings = settings.flat() if isinstance(settings, TrainConfig) else settings
    keep = _identity(settings, _NOT_IN_SWEEP_KEY)
    if keep.get("num_processes") == 1:
        del keep["num_processes"]
    if model_revision:
        keep["model_revision"] = model_revision
    return _digest({**keep, "data_fingerprint": data_fingerprint})


def planner_inputs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The memory planner's keyword arguments, taken from a configuration (a TrainConfig as a dict, or params)."""
    return {k: settings[k] for k in PLANNER_SETTINGS}
