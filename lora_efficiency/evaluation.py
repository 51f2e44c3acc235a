"""Held-out loss and perplexity, token-weighted over target (response) tokens; padding and prompt excluded."""

from __future__ import annotations

import contextlib
import math

import torch

from lora_efficiency.data import Rows, collate
from lora_efficiency.loss import token_loss_sum


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    rows: Rows,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """eval/loss (mean cross-entropy per target token), eval/perplexity = exp(loss), eval/tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for start in range(0, len(rows), batch_size):
        batch = collate(rows, list(range(start, min(start + batch_size, len(rows)))), pad_id=pad_id)
        with autocast:
            loss_sum, n = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        total += float(loss_sum)
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(loss), "eval/tokens": float(count)}
