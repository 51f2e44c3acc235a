"""Per-example attention (attention.py): the same numbers as transformers' masked sdpa on packed rows, used only
where a packed training forward is, and only on the architectures it is checked for."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lora_efficiency import attention
from lora_efficiency.errors import UserError
from lora_efficiency.models import set_attention


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2
        vocab_size=101,
        max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def _packed_batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 101, (3, 40))
    positions = torch.tensor(
        [
            [*range(10), *range(25), *range(5)],  # three examples
            list(range(40)),  # one example filling the row
            [*range(12), *range(28)],  # an example, then a padding tail (positions restart at 0 there too)
        ]
    )
    return ids, positions


def _loss_and_grads(model, ids, positions):
    model.zero_grad()
    out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_example_lengths_split_rows_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert attention.example_lengths(positions) == [[3, 2, 1], [6]]


def test_loss_and_gradients_equal_transformers_sdpa_on_packed_rows():
    model = _llama()
    ids, positions = _packed_batch()
    reference_loss, reference_grads = _loss_and_grads(model, ids, positions)
    model.set_attn_implementation(attention.register())
    calls = []
    original = attention.per_example_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(attention.NAME, spy)
    try:
        loss, grads = _loss_and_grads(model, ids, positions)
    finally:
        attention.register()
    assert len(calls) == 2  # one call a layer: the per-example path ran
    assert torch.allclose(loss, reference_loss, atol=1e-5)
    for g, ref in zip(grads, reference_grads, strict=True):
        assert torch.allclose(g, ref, atol=1e-5)
    # ... and packing matters: one causal run over each whole row (attending across examples) gives another loss
    model.set_attn_implementation("sdpa")
    whole_rows = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert abs(whole_rows.item() - reference_loss.item()) > 1e-4


def test_generation_with_left_padding_is_unchanged():
    model = _llama(seed=2).eval()
    prompts = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    mask = (prompts != 0).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompts, **kwargs)
    model.set_attn_implementation(attention.register())
    assert torch.equal(model.generate(prompts, **kwargs), expected)


def test_set_attention_by_architecture():
    llama = _llama()
    assert set_attention(llama, "sdpa") == "sdpa"
    assert set_attention(llama, "auto") == attention.NAME
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50), attn_implementation="sdpa"
    )
    assert set_attention(gpt2, "auto") == "sdpa"  # GPT-2's attention never sees position_ids
    with pytest.raises(UserError, match=r"attention='per_example': model type 'gpt2' is not one of"):
        set_attention(gpt2, "per_example")
