"""Pinned losses: an accidental change to the maths (loss, masking, packing, schedule, init) shows up here.

The numbers were produced by this test's own configuration on the CPU (fp32 base, so no bf16 rounding) and
pinned; if a change to the maths is intended, print result.losses and update them in
the same commit, saying why.
"""

import pytest

from lora_efficiency.models import resolve_model
from lora_efficiency.trainer import train

PINNED_LOSSES = [11.859401, 11.769796, 11.948836, 11.993022, 12.085358, 11.338182]
PINNED_EVAL_LOSS = 11.987365


def test_pinned_loss_curve(tiny_model_dir, tiny_data_dir, tmp_path):
    result = train(
        model=resolve_model(str(tiny_model_dir)),
        data=str(tiny_data_dir),
        quantization="fp32",
        max_steps=6,
        batch_size=2,
        seq_len=256,
        lr=1e-3,
        warmup_ratio=0.0,
        dropout=0.0,
        seed=0,
        eval_samples=8,
        output_dir=str(tmp_path / "adapter"),
    )
    assert result.losses == pytest.approx(PINNED_LOSSES, rel=1e-5)
    assert result.metrics["eval/loss"] == pytest.approx(PINNED_EVAL_LOSS, rel=1e-5)
