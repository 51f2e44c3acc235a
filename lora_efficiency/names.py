"""The names settings accept, as plain data: lora_efficiency.config checks them at parse time without importing
what loads models (torch, transformers) or data sets (datasets); models.py and sources.py take them from here."""

from __future__ import annotations

import re
from pathlib import Path

BUNDLED_MODEL = "smollm2-135m"
QUANTIZATIONS = ("nf4", "fp4", "int8", "bf16", "fp16", "fp32")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Data sets by name: the hub's (sources.HUB_SETS has one entry per name here; tests/unit/test_sources.py checks it),
# the bundled instruction set and the Python docs
BUNDLED_DATA = "instruct"
PYTHON_DOCS = "python-docs"
HUB_SET_NAMES = ("alpaca-cleaned", "dolly-15k", "guanaco", "code-alpaca", "gsm8k", "wikitext-2")
KNOWN_SETS: tuple[str, ...] = (*HUB_SET_NAMES, BUNDLED_DATA, PYTHON_DOCS)


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a model (checked at parse time, before anything loads), or None."""
    if name == BUNDLED_MODEL:
        return None
    try:  # a name the OS refuses (longer than NAME_MAX, a NUL byte) is no folder
        local = Path(name).expanduser()
        is_dir, exists = local.is_dir(), local.exists()
    except (OSError, ValueError, RuntimeError):
        is_dir = exists = False
    if is_dir:
        if not (local / "config.json").exists():
            return f"model={name!r} is a folder without config.json: expected a Hugging Face model folder"
        return None
    if exists or name.startswith(("/", ".", "~")) or not _HUB_ID.match(name):
        return (
            f"model={name!r} does not exist: allowed are {BUNDLED_MODEL!r}, a local Hugging Face folder "
            "or a hub id such as 'meta-llama/Llama-3.2-1B'"
        )
    return None


PRESETS: dict[str, tuple[str, ...]] = {
    "q_v": ("q", "v"),
    "q_k_v": ("q", "k", "v"),
    "attention": ("q", "k", "v", "o"),
    "mlp": ("mlp",),
    "attention_mlp": ("q", "k", "v", "o", "mlp"),
    "all_linear": (),  # every linear layer but the output head
}
_MODULE_NAME = re.compile(r"^[A-Za-z_][\w.]*$")

# When two presets adapt the same matrices, the one a sweep trains and the report names first: the broadest name
# (on Llama-style models attention_mlp and all_linear both name q, k, v, o, gate, up and down).
PRESET_PREFERENCE = ("all_linear", "attention_mlp", "attention", "mlp", "q_k_v", "q_v")


def preferred_name(specs) -> str:
    """Of target_modules values that adapt the same modules, the one that names them: a preset before a comma list,
    the broadest preset first (PRESET_PREFERENCE)."""
    return min(specs, key=lambda s: (PRESET_PREFERENCE.index(s) if s in PRESET_PREFERENCE else len(PRESETS), s))


def is_valid_target_spec(spec: str) -> bool:
    """Shape check at parse time; whether the names exist is checked against the loaded model. Every item of a comma
    list is a name: `q_proj,,v_proj` or a trailing comma is a typo, not a shorter list."""
    return spec in PRESETS or all(_MODULE_NAME.match(s.strip()) for s in spec.split(","))
