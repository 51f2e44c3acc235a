"""Pure parts of the benchmark: model FLOPs per token, the markdown block, `-X importtime` parsing."""

from __future__ import annotations

import math

import torch

from lora_efficiency.bench import import_times, training_flops_per_token, write_markdown
from lora_efficiency.bench.figures import model_matmul_rate, performed_flops_per_token
from tests.conftest import tiny_llama_config

# 2 blocks; per block q 64x64, k and v 64x32 (2 kv heads of 16), o 64x64, gate/up/down 64x128; head tied
TINY = tiny_llama_config(1000)


def test_flops_per_token_counts_frozen_lora_head_and_attention():
    config = TINY
    flops = training_flops_per_token(config, rank=8, target_modules="attention", context=50)
    # per layer: q 64x64, k and v 64x32 (2 kv heads of 16), o 64x64, gate/up/down 64x128
    frozen = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128)
    lora = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))
    assert flops["frozen_params"] == frozen and flops["lora_params"] == lora
    expected = 4 * frozen + 6 * lora + 4 * 1000 * 64 + 12 * 2 * 4 * 16 * 50
    assert flops["total"] == expected


def test_model_matmul_rate_times_each_frozen_shape_of_the_model():
    shaped = model_matmul_rate(TINY, 32, torch.device("cpu"), repeats=1)
    # 7 linear layers a block, 2 blocks; shapes (in, out): q and o 64x64, k and v 64x32, gate and up 64x128,
    # down 128x64: 4 distinct
    assert (shaped["rows"], shaped["layers"], shaped["shapes"]) == (32, 14, 4)
    assert math.isfinite(shaped["bf16_flops"]) and shaped["bf16_flops"] > 0


def test_markdown_block_is_replaced_and_other_text_kept(tmp_path):
    path = tmp_path / "benchmarks.md"
    write_markdown(path, "## cpu run 1\n", "cpu-m")
    text = path.read_text()
    assert text.startswith("# Benchmarks") and "<!-- bench:cpu-m -->\n## cpu run 1\n<!-- /bench:cpu-m -->" in text
    path.write_text(text + "\nWhat bounds it: the analysis.\n")
    write_markdown(path, "## gpu run\n", "cuda-m")
    write_markdown(path, "## cpu run 2\n", "cpu-m")
    text = path.read_text()
    assert "cpu run 1" not in text and "## cpu run 2" in text and "## gpu run" in text
    assert "What bounds it: the analysis." in text
    assert text.index("cpu run 2") < text.index("the analysis") < text.index("gpu run")


def test_import_times_attributes_own_time_to_packages():
    stderr = "\n".join(
        [
            "import time: self [us] | cumulative | imported package",
            "import time:       100 |        100 |   torch._C",
            "import time:       500 |        500 |   torch.nn",
            "import time:      2000 |       2600 | torch",
            "import time:       300 |        300 |   mlflow",
            "import time:       200 |        500 | lora_efficiency.trainer",
            "some other line",
        ]
    )
    out = import_times(stderr)
    assert abs(out["total_s"] - 0.0031) < 1e-9  # the top-level lines' cumulative times
    assert out["packages_s"] == {"torch": 0.0026, "mlflow": 0.0003, "lora_efficiency": 0.0002}


def test_performed_flops_count_what_each_side_computes():
    parts = {"frozen_params": 100.0, "lora_params": 10.0, "head_params": 1000.0, "attention_per_pair": 7.0}
    packed = {
        "positions_per_token": 1.1,  # 10% of a packed row is padding
        "head_positions_per_token": 0.5,  # the head on the loss targets only, recomputed
        "head_factor": 6,
        "attention_pairs_per_token": 90.0,
    }
    assert performed_flops_per_token(parts, packed) == 1.1 * (400 + 60) + 0.5 * 6 * 1000 + 90 * 7
    # gradient checkpointing recomputes the layers' forward: 6 a frozen weight, 8 a LoRA weight, 16/12 a pair
    padded = {**packed, "head_positions_per_token": 1.1, "head_factor": 4, "gradient_checkpointing": True}
    assert performed_flops_per_token(parts, padded) == 1.1 * (600 + 80) + 1.1 * 4 * 1000 + 90 * 7 * 16 / 12


def test_an_overhead_interval_that_straddles_the_target_cannot_tell():
    from lora_efficiency.bench.render import _interval_verdict

    assert _interval_verdict([-0.01, 0.015], 0.02) == " (met: <= 0.02)"
    assert _interval_verdict([0.03, 0.05], 0.02) == " (short: <= 0.02)"
    assert _interval_verdict([-1.18, 1.16], 0.02) == " (cannot tell: <= 0.02)"
