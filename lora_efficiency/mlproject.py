"""MLproject, written from configs/default.yaml: `make mlproject` (python -m lora_efficiency.mlproject > MLproject).

configs/default.yaml is the one place defaults live; MLproject only lists them again for `mlflow run`, so it is
generated, never edited by hand (tests/unit/test_mlproject.py fails when the two differ).
"""

from __future__ import annotations

import json
from typing import Any

from lora_efficiency.config import (
    EvaluateConfig,
    PrepareConfig,
    ReportConfig,
    StudyConfig,
    SweepConfig,
    TrainConfig,
    convert,
    read_defaults,
)
from lora_efficiency.settings import setting_fields

HEADER = """\
# GENERATED from configs/default.yaml by `make mlproject`: edit the defaults there, not here
# (tests/unit/test_mlproject.py fails when this file differs from what the generator writes).
name: lora-efficiency
# Entry points wrap one shared trainer (lora_efficiency/). Without conda, add `--env-manager local`:
#   mlflow run . -e train --env-manager local -P rank=16 -P target_modules=attention -P quantization=nf4
conda_env: conda.yaml

entry_points:
"""
# entry point -> (its section of configs/default.yaml, its settings class, a comment line above it or "")
ENTRY_POINTS: dict[str, tuple[str, type, str]] = {
    "prepare": ("prepare", PrepareConfig, ""),
    "train": (
        "train",
        TrainConfig,
        "# config: a settings.yaml (a run's, or runs:/<id>/settings.yaml), else configs/default.yaml's train section.\n"
        "  # Every train setting is a -P too (rank, lr, ...: MLflow passes an undeclared -P on as --name value), so\n"
        "  # only what is given overrides the file, and the run's params are what it trained with.",
    ),
    "evaluate": ("evaluate", EvaluateConfig, ""),
    "sweep": ("sweep", SweepConfig, ""),
    "main": ("main", StudyConfig, "# The whole study: prepare, baselines, the rank, module and quantization sweeps."),
    "report": (
        "report",
        ReportConfig,
        "# Charts, findings and recommendations from the runs API: report.md, report.html, logged as a run tagged "
        "report=true.",
    ),
}
# Entry points that declare one settings file instead of their settings: MLflow passes every -P it does not
# declare as `--name value`, so a setting not given stays the file's (a declared one would always be passed, at
# its default, and `mlflow run` would log that default as the run's param while the file's value trained).
SETTINGS_FILE_ONLY = {"train": "config"}
_TYPES = {int: "int", float: "float"}


def _value(raw: Any, kind: type) -> str:
    value, problem = convert("default", raw, kind)
    if problem:
        raise ValueError(problem)
    if kind is bool:
        return json.dumps(str(value).lower())
    return repr(value) if kind in _TYPES else json.dumps(value)


def render() -> str:
    """The whole MLproject text."""
    out = [HEADER]
    for entry, (section, cls, comment) in ENTRY_POINTS.items():
        defaults, hints = read_defaults(section), {f.name: kind for f, kind in setting_fields(cls)}
        names = list(hints)
        if comment:
            out.append(f"  {comment}\n")
        out.append(f"  {entry}:\n    parameters:\n")
        if entry in SETTINGS_FILE_ONLY:
            names = [SETTINGS_FILE_ONLY[entry]]
            defaults, hints = {names[0]: ""}, {names[0]: str}
        for name in names:
            kind = hints[name]
            spec = f"type: {_TYPES.get(kind, 'string')}, default: {_value(defaults[name], kind)}"
            out.append(f"      {name}: {{{spec}}}\n")
        flags = " ".join(f"--{n} {{{n}}}" for n in names)
        out.append(f'    command: "python -m entrypoints.{entry} {flags}"\n\n')
    return "".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render(), end="")
