"""Attention that stays inside each packed example: transformers' SDPA called once per example of a packed row.

A packed row holds several examples whose position ids restart at 0. transformers' `sdpa` turns that into a
block-diagonal causal mask over the whole row and computes every query against every key of the row: on the
bundled set a 512-token row holds ~5.5 examples of ~92 tokens, so ~5x more attention scores are computed than
any example needs, and a mask rules out SDPA's causal fast path. `per_example` registers, through transformers'
own AttentionInterface / AttentionMaskInterface (no model code patched), an implementation that skips the mask
and calls `sdpa_attention_forward` causally on each example's slice: the same function on the same numbers, so
the loss is the same (tests/unit/test_attention.py: equal to sdpa's to 1e-5 in fp32 on a tiny model).

Whatever is not a packed training forward takes the plain SDPA path with the mask transformers builds: decoding
with a cache, left-padded generation, a model whose attention does not receive `position_ids`. Only the
architectures in PER_EXAMPLE_MODEL_TYPES use it: each is checked to pass `position_ids` down to its attention
function (a model that did not would see one causal run over the whole row, i.e. attend across examples).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "per_example_sdpa"
# Decoder families whose attention layers receive position_ids (checked in transformers 5.23's modeling code)
# and use plain causal self-attention, so per-example SDPA equals transformers' sdpa on packed rows.
PER_EXAMPLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def example_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the length of each example: a new example starts wherever the position id is 0."""
    lengths = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0 and i > 0]
        edges = [0, *starts, len(row)]
        lengths.append([e - s for s, e in zip(edges[:-1], edges[1:], strict=True)])
    return lengths


# Run eagerly inside compiled layers (models.compile_layers): the examples' lengths are data (a .tolist() of the
# positions), so dynamo traced each new split into a graph of its own and recompiled every step (tiny Llama, 3
# steps of 2 x 128 tokens: 52-70 s a step against 4 s eager). Left out, a compiled layer is two graphs of fixed
# shape (before and after attention), compiled once.
@torch.compiler.disable
def per_example_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature (query/key/value as batch, heads, tokens, head_dim); returns
    (output as batch, tokens, heads, head_dim, None)."""
    position_ids = kwargs.pop("position_ids", None)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or position_ids is None or q_len != kv_len or q_len == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    for b, lengths in enumerate(example_lengths(position_ids.expand(query.shape[0], -1))):
        pieces = zip(
            query[b : b + 1].split(lengths, 2),
            key[b : b + 1].split(lengths, 2),
            value[b : b + 1].split(lengths, 2),
            strict=True,
        )
        parts = []
        for q, k, v in pieces:
            with _kernel(q.device, q.shape[2]):
                parts.append(sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0])
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0], None


# On the CPU, SDPA's math kernel beats its flash kernel on short examples and loses on long ones (forward +
# backward of causal bf16 attention, 9 heads of 64, 2,048 tokens cut into examples, 1 thread, 2026-12-02 on this
# 2-core EPYC: 64 tokens 39 vs 50 ms, 128: 47 vs 58 ms, 256: 82 vs 73 ms, 512: 161 vs 117 ms). The math kernel
# also keeps each example's heads x length^2 probabilities for backward, so it is kept to short examples.
MATH_KERNEL_MAX_TOKENS = 128


def _kernel(device: torch.device, length: int):
    if device.type == "cpu" and length <= MATH_KERNEL_MAX_TOKENS:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _mask(**kwargs):
    """No mask where none was given (a packed training row: per_example_attention splits it); otherwise the
    mask transformers' sdpa would build (generation with padding)."""
    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(**kwargs)


def register() -> str:
    """Make NAME a transformers attention implementation (idempotent); returns NAME."""
    AttentionInterface.register(NAME, per_example_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def supports_per_example(config) -> bool:
    """Whether `config`'s model may use per-example attention (see PER_EXAMPLE_MODEL_TYPES)."""
    return getattr(config, "model_type", None) in PER_EXAMPLE_MODEL_TYPES
