"""Token-weighted causal-LM loss over the target tokens only, with the vocabulary projection done in chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_efficiency.data import IGNORE_INDEX

# Each chunk's logits are recomputed in backward (checkpoint), so only one chunk's exist at any time; that
# backward holds three fp32 chunk-sized tensors (logits, softmax, gradient), measured as exactly
# 3 x chunk x vocab x 4 bytes of peak RSS: 604 MB at 1,024 tokens x 49,152 (tests/unit/test_memory_estimate.py
# relies on it). Response-only labels keep most CPU batches to one chunk (~350 targets per 4 x 512 packed
# rows of the bundled set); smaller chunks would cut the peak for plain-text data, at a speed cost not yet measured.
LOSS_CHUNK_TOKENS = 1024


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside a PeftModel, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE_INDEX, and their count.

    Logits are computed only for target positions (prompt and padding never reach the 49k-wide head), in
    chunks of LOSS_CHUNK_TOKENS. Models that post-process logits (softcapping, logit scaling) take the plain
    forward instead, so the loss stays the model's own.
    """
    lm = _causal_lm(model)
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    cfg = lm.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        logits = logits[:, :-1]
        return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum"), count
    # use_cache=False matters beyond memory: transformers builds the block-diagonal mask of a packed row from
    # position_ids only when there is no KV cache; with one, packed examples silently attend to each other.
    hidden = lm.base_model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state
    hidden, targets = hidden[:, :-1][mask], targets[mask]
    head = lm.get_output_embeddings()
    # A micro-batch whose responses were all cut off by seq_len has no target: a zero that is still part of the
    # graph (the sum of an empty selection), so backward() adds nothing instead of failing ("element 0 of
    # tensors does not require grad"). Data with no target at all is refused before training (trainer.setup).
    total = hidden.float().sum() * 0.0
    for start in range(0, count, LOSS_CHUNK_TOKENS):
        h, y = hidden[start : start + LOSS_CHUNK_TOKENS], targets[start : start + LOSS_CHUNK_TOKENS]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_ce_sum, head, h, y, use_reentrant=False)
        else:
            total = total + _head_ce_sum(head, h, y)
    return total, count
