"""The benchmark end to end on the tiny model: one mode, 3 steps, 1 repeat, one startup launch (~3 min: two of its
seven sides compile)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import ROOT, subprocess_env


def test_bench_writes_json_and_markdown(tiny_model_dir, tiny_data_file, tmp_path):
    markdown, results_file = tmp_path / "benchmarks.md", tmp_path / "bench-results.json"
    markdown.write_text("# Benchmarks\n\nNotes the benchmark must keep.\n")
    cmd = [
        sys.executable,
        "-m",
        "entrypoints.bench",
        *("--model", str(tiny_model_dir), "--data", str(tiny_data_file), "--modes", "bf16", "--device", "cpu"),
        *("--steps", "3", "--warmup_steps", "1", "--repeats", "1", "--batch_size", "2", "--seq_len", "256"),
        *("--profile_steps", "0", "--startup_launches", "1"),
        *("--output", str(markdown), "--json", str(results_file)),
    ]
    env = subprocess_env(TMPDIR=str(tmp_path))  # the workers' folder goes there, not into /tmp
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads(results_file.read_text())
    bf16 = results["modes"]["bf16"]
    keys = ("tokens_per_second_ratio", "tokens_per_second_ratio_strong", "peak_memory_ratio_strong", "mfu")
    for key in (*keys, "per_example_attention_speedup"):
        assert math.isfinite(bf16[key]) and bf16[key] > 0, (key, bf16[key])
    flipped = "project_eager" if bf16["project_compile"] else "project_compiled"
    assert set(bf16["mfu_by_side"]) == {
        "reference",
        "reference_strong",
        "reference_strong_compiled",
        "project",
        "project_untracked",
        "project_sdpa",
        flipped,
    }
    # the project is held to the faster strong reference: eager, or with TrainingArguments(torch_compile=True)
    strong = bf16["strong_reference"]
    assert bf16[strong]["tokens_per_second"] == max(
        bf16[s]["tokens_per_second"] for s in ("reference_strong", "reference_strong_compiled")
    )
    assert (
        bf16["tokens_per_second_ratio_strong"]
        == bf16["project"]["tokens_per_second"] / bf16[strong]["tokens_per_second"]
    )
    assert bf16["compile_speedup"] > 0 and bf16["reference_strong_compile_speedup"] > 0
    # on minus off: the two runs' noise can make it negative on 0.1 s steps, never non-finite
    assert math.isfinite(bf16["tracking_overhead"]) and bf16["tracking_overhead"] > -1
    for side in bf16["mfu_by_side"]:
        for key in (
            "tokens_per_second",
            "step_time_s",
            "tokens_per_step",
            "peak_memory_mb",
            "performed_flops_per_token",
        ):
            assert math.isfinite(bf16[side][key]) and bf16[side][key] > 0, (side, key)
    # length-grouped batches pad less than random ones; the project's per-example attention computes fewer
    # FLOPs a token than the same trainer with masked sdpa over whole rows
    assert bf16["reference_strong"]["padding_fraction"] < bf16["reference"]["padding_fraction"]
    assert bf16["project_untracked"]["performed_flops_per_token"] < bf16["project_sdpa"]["performed_flops_per_token"]
    assert not bf16["reference_strong_gradient_checkpointing"]
    # the same examples a step on both sides: real tokens a step within a factor of 2
    for side in ("reference", "reference_strong"):
        assert 0.5 < bf16["project"]["tokens_per_step"] / bf16[side]["tokens_per_step"] < 2
    assert results["matmul"]["bf16_flops"] > 0 and results["matmul"]["fp32_flops"] > 0
    # the MFU ceiling: the model's frozen products at the project's step shape (2 x 256 rows) over the square rate
    assert results["model_matmul"]["rows"] == 2 * 256
    assert bf16["mfu_ceiling"] == results["model_matmul"]["bf16_flops"] / results["matmul"]["bf16_flops"]
    startup = results["startup"]
    assert startup["launches_s"][0] > 0 and startup["fresh_launches_s"][0] > 0  # forked from the warm server; fresh
    assert startup["server_start_s"] > 0 and startup["forked"]

    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nNotes the benchmark must keep.\n")
    assert "<!-- bench:cpu-" in text and "### bf16 base" in text
    assert "| bf16 |" in text and "real tokens/s" in text
    assert f"(ceiling {100 * bf16['mfu_ceiling']:.1f} %)" in text
    assert "| bf16 |" in proc.stdout  # printed too
