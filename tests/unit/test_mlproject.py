"""MLproject is generated from configs/default.yaml (`make mlproject`): the defaults live in one place."""

from __future__ import annotations

import subprocess
import sys

import yaml

from lora_efficiency import mlproject
from lora_efficiency.config import DEFAULTS_FILE

ROOT = DEFAULTS_FILE.parents[1]


def test_mlproject_is_what_the_generator_writes():
    assert (ROOT / "MLproject").read_text(encoding="utf-8") == mlproject.render(), (
        "MLproject differs from configs/default.yaml: run `make mlproject`"
    )


def test_the_generator_follows_a_changed_default(tmp_path, monkeypatch):
    """A default changed in default.yaml changes MLproject's text, so the test above catches a stale MLproject."""
    changed = DEFAULTS_FILE.read_text(encoding="utf-8").replace("  eval_fraction: 0.1 ", "  eval_fraction: 0.2 ")
    assert changed != DEFAULTS_FILE.read_text(encoding="utf-8")
    (tmp_path / "default.yaml").write_text(changed, encoding="utf-8")
    real = mlproject.read_defaults
    monkeypatch.setattr(mlproject, "read_defaults", lambda section: real(section, tmp_path / "default.yaml"))
    project = yaml.safe_load(mlproject.render())
    assert project["entry_points"]["prepare"]["parameters"]["eval_fraction"]["default"] == 0.2


def test_make_mlproject_command_writes_the_file():
    out = subprocess.run(
        [sys.executable, "-m", "lora_efficiency.mlproject"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "MLproject").read_text(encoding="utf-8")
