"""The loss is the model's own: same value as transformers' loss, packed or not, chunked or not."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_efficiency import loss as loss_module
from lora_efficiency.data import bundled_instruct, collate, pack, tokenize, unpacked
from lora_efficiency.loss import token_loss_sum


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    train, _ = bundled_instruct(num_train=12, num_eval=0, seed=3)
    return model, tokenizer, tokenize(tokenizer, train, seq_len=512)


def _mean_loss(model, rows, pad_id):
    batch = collate(rows, list(range(len(rows))), pad_id=pad_id)
    with torch.no_grad():
        total, count = token_loss_sum(model, batch)
    return float(total) / count


def test_matches_transformers_loss_per_example(setup):
    model, tokenizer, split = setup
    ours, theirs = [], []
    for ids, labels in zip(split.input_ids, split.labels, strict=True):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        theirs.append(float(out.loss))
        ours.append(_mean_loss(model, unpacked(type(split)([ids], [labels])), tokenizer.pad_token_id))
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_packed_equals_unpacked(setup):
    model, tokenizer, split = setup
    packed_rows = pack(split, seq_len=512)
    assert len(packed_rows) < len(split.input_ids)  # several examples really share a row
    packed = _mean_loss(model, packed_rows, tokenizer.pad_token_id)
    padded = _mean_loss(model, unpacked(split), tokenizer.pad_token_id)
    assert packed == pytest.approx(padded, rel=1e-5)


def test_chunking_does_not_change_loss_or_gradients(setup, monkeypatch):
    model, tokenizer, split = setup
    rows = pack(split, seq_len=512)
    batch = collate(rows, list(range(len(rows))), pad_id=tokenizer.pad_token_id)
    results = []
    for chunk in (10_000, 7):
        monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", chunk)
        model.zero_grad()
        total, _ = token_loss_sum(model, batch)
        total.backward()
        results.append((float(total.detach()), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    # a summed loss gives large gradients; fp32 summation order differs between chunkings
    scale = float(results[0][1].abs().max())
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-5 * scale)
