"""Token-weighted causal-LM loss over the target tokens only: the vocabulary projection in chunks where the output
head is proven plain, the model's own logits path everywhere else."""

from __future__ import annotations

import inspect
import sys

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

# Classes whose logits are exactly `lm_head(last_hidden_state)` in the installed transformers (5.23): read in
# their forward and checked by tests/unit/test_loss.py::test_plain_head_classes_match_their_own_loss. Only these
# take the chunked path. Every other class keeps its own post-processing (Gemma-2's final_logit_softcapping,
# Granite's `/ logits_scaling`, FalconH1's lm_head_multiplier, Cohere's logit_scale, ...) by running its own
# forward: an allow-list, because a deny-list of config attributes misses the next model that scales differently.
PLAIN_HEAD_CLASSES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside a PeftModel, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def uses_chunked_head(model: torch.nn.Module) -> bool:
    """Whether token_loss_sum projects hidden states through the head itself (in chunks) for this model."""
    return type(_causal_lm(model)).__name__ in PLAIN_HEAD_CLASSES


def _keeps_masked_logits(lm: torch.nn.Module) -> bool:
    """The class's forward takes `logits_to_keep` and slices with transformers' slice_logits_to_keep, which
    accepts a boolean (batch, seq) mask and returns the kept positions flattened (modeling_utils, 5.23)."""
    module = sys.modules.get(type(lm).__module__)
    return "logits_to_keep" in inspect.signature(lm.forward).parameters and hasattr(module, "slice_logits_to_keep")


def _head_ce_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _own_target_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The logits of the target positions (row by row, in order) through the model's own forward; only those
    positions' logits are computed where the model allows it."""
    lm = _causal_lm(model)
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    if _keeps_masked_logits(lm):
        keep = F.pad(mask, (0, 1), value=False)  # position t predicts label t + 1; the last one predicts nothing
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[:, :-1][mask]


def _own_logits_ce_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The loss through the model's own forward."""
    targets = batch["labels"][:, 1:][mask]
    return F.cross_entropy(_own_target_logits(model, batch, mask).float(), targets, reduction="sum")


def _target_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The last hidden states at the target positions (row by row, in order), for the chunked head."""
    # use_cache=False matters beyond memory: transformers builds the block-diagonal mask of a packed row from
    # position_ids only when there is no KV cache; with one, packed examples silently attend to each other.
    hidden = (
        _causal_lm(model)
        .base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        .last_hidden_state
    )
    return hidden[:, :-1][mask]


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE_INDEX, and their count.

    Logits are computed only for target positions (prompt and padding never reach the 49k-wide head). For the
    PLAIN_HEAD_CLASSES they are computed here in chunks of LOSS_CHUNK_TOKENS; any other model runs its own
    forward (all target logits at once), so the loss stays the model's own.
    """
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    if not uses_chunked_head(model):
        return _own_logits_ce_sum(model, batch, mask), count
    hidden, targets = _target_hidden(model, batch, mask), targets[mask]
    head = _causal_lm(model).get_output_embeddings()
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


@torch.no_grad()
def target_token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The next-token cross-entropy (float32) of every target position of `batch` (evaluation, no gradient), row by
    row in order: the positions where labels[:, 1:] is not IGNORE_INDEX."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    if not uses_chunked_head(model):
        return F.cross_entropy(_own_target_logits(model, batch, mask).float(), targets[mask], reduction="none")
    hidden, targets = _target_hidden(model, batch, mask), targets[mask]
    head = _causal_lm(model).get_output_embeddings()
    chunks = [
        F.cross_entropy(
            head(hidden[start : start + LOSS_CHUNK_TOKENS]).float(),
            targets[start : start + LOSS_CHUNK_TOKENS],
            reduction="none",
        )
        for start in range(0, len(targets), LOSS_CHUNK_TOKENS)
    ]
    return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def token_loss_by_row(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `batch` (evaluation, no gradient): the sum of next-token cross-entropy over the row's target
    positions (float32) and their count. Summed over the rows: token_loss_sum's two numbers, to float rounding."""
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]  # the row of each target position, in the order the losses come
    sums = torch.zeros(mask.shape[0], dtype=torch.float32, device=mask.device)
    return sums.index_add_(0, rows, target_token_losses(model, batch)), mask.sum(dim=1)
