"""The GPU kit's check (scripts/gpu_check.sh, docs/gpu.md) dry-run on the CPU: the same stages as on the GPU
machine with tiny settings, minus the wheel install and the bench's nf4 mode. 219-290 s on 2026-12-04 on the
2-core machine shared with other work (load average 5-7), the bench's 6 processes ~45 % of it. What it proves:
the one command the next GPU session runs gets through every stage and writes the files and fields that session
reads, so no GPU minute goes to a typo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.gpu_kit


def test_dry_run_writes_every_stage_and_its_figures(tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    env = {**subprocess_env(), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    cmd = ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), "--pack", str(tokenizer_dir)]
    proc = subprocess.run([*cmd, "--budget_s", "900"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=960)
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    failed = {k: v.get("error", v) for k, v in stages.items() if not v.get("ok")}
    assert proc.returncode == 0 and results["ok"], (failed, proc.stdout[-2000:], proc.stderr[-2000:])
    # the device tool brings back at most 8 files from $OUT (install.log is written on the GPU only)
    files = {p.name for p in out.iterdir()}
    assert files == {"results.json", "check.log", "pytest.log", "bench-results.json", "benchmarks.md"}
    assert list(stages) == ["env", "model", "train", "bench", "pytest", "entry", "done"]

    env_stage = stages["env"]
    assert env_stage["cuda_available"] is False and env_stage["versions"]["torch"]
    assert env_stage["bitsandbytes"]["backend"] == "CPU"
    assert stages["model"]["config"]["num_hidden_layers"] == 2  # the dry run's tiny shape

    runs = stages["train"]["runs"]
    assert [r["settings"]["quantization"] for r in runs.values()] == ["nf4", "int8", "bf16", "nf4", "int8", "bf16"]
    assert len({(r["settings"]["rank"], r["settings"]["target_modules"]) for r in runs.values()}) == 4
    for run in runs.values():
        assert run["memory_source"] == "rss" and run["finite_losses"], run
        assert run["metrics"]["memory/peak_mb"] > 0 and run["predicted_mb"] > 0
        assert run["planner_error"] == pytest.approx(run["metrics"]["memory/peak_mb"] / run["predicted_mb"] - 1)
    assert stages["train"]["planner_max_abs_error"] == max(abs(r["planner_error"]) for r in runs.values())

    entry = stages["entry"]
    assert entry["status"] == "FINISHED" and entry["tags"]["memory_source"] == "rss"
    assert entry["metrics"]["memory/peak_mb"] > 0 and "adapter" in entry["artifacts"]

    bench = stages["bench"]
    assert bench["matmul"]["bf16_flops"] > 0
    bf16 = bench["modes"]["bf16"]
    for side in ("project", "reference", "reference_strong"):
        assert bf16[f"{side}_tokens_per_second"] > 0 and bf16[f"{side}_peak_memory_mb"] > 0
        assert bf16["mfu_by_side"][side] > 0
    assert json.loads((out / "bench-results.json").read_text())["settings"]["device"] == "cpu"

    # on the CPU every test marked gpu is skipped, none fails
    assert stages["pytest"]["counts"].get("skipped", 0) >= 4 and "failed" not in stages["pytest"]["counts"]
