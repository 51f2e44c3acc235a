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


# ---------------------------------------------------------------------------------------------------------
# Models whose logits are not lm_head(hidden): the loss must still be the model's own.

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,  # logits far from uniform, so a wrong scaling shows in the loss
)


def _tiny_model(kind: str) -> torch.nn.Module:
    import transformers as T

    configs = {
        "llama": lambda: T.LlamaConfig(**TINY),
        "mistral": lambda: T.MistralConfig(**TINY),
        "qwen2": lambda: T.Qwen2Config(**TINY),
        "qwen3": lambda: T.Qwen3Config(**TINY, head_dim=8),
        # Granite divides its logits by logits_scaling; Gemma-2 soft-caps them at final_logit_softcapping
        "granite": lambda: T.GraniteConfig(**TINY, logits_scaling=4.0),
        "gemma2": lambda: T.Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=2.0, sliding_window=16),
    }
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(configs[kind](), dtype=torch.float32).eval()


def _batch(vocab: int = 96, rows: int = 3, length: int = 40) -> dict[str, torch.Tensor]:
    """Random tokens; the first 5-14 positions of each row are prompt (IGNORE_INDEX), the rest targets."""
    from lora_efficiency.data import IGNORE_INDEX

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = input_ids.clone()
    for r in range(rows):
        labels[r, : 5 + 3 * r + int(torch.randint(0, 3, (), generator=g))] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(length).expand(rows, -1)}


def _theirs(model, batch) -> float:
    with torch.no_grad():
        return float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)


def _ours(model, batch) -> float:
    with torch.no_grad():
        total, count = token_loss_sum(model, batch)
    return float(total) / count


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_plain_head_classes_match_their_own_loss(kind):
    """Every class in PLAIN_HEAD_CLASSES: the chunked head gives transformers' loss (what admits it to the list)."""
    model, batch = _tiny_model(kind), _batch()
    assert loss_module.uses_chunked_head(model)
    assert type(model).__name__ in loss_module.PLAIN_HEAD_CLASSES
    assert _ours(model, batch) == pytest.approx(_theirs(model, batch), abs=1e-5)


@pytest.mark.parametrize("kind", ["granite", "gemma2"])
def test_scaled_logits_give_the_models_own_loss(kind):
    model, batch = _tiny_model(kind), _batch()
    assert not loss_module.uses_chunked_head(model)
    theirs = _theirs(model, batch)
    assert _ours(model, batch) == pytest.approx(theirs, abs=1e-5)
    # the test can fail: the plain head (the chunked path these models used to take) gives another loss
    from lora_efficiency.data import IGNORE_INDEX

    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    with torch.no_grad():
        plain = float(torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), targets[keep]))
    assert abs(plain - theirs) > 1e-2


def test_own_logits_path_keeps_gradients_and_peft():
    """Through peft's wrapper, with gradients: the loss and the LoRA gradient equal transformers' own."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_model("granite"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for module in model.modules():  # LoRA's B starts at zero: give it weight so the gradient reaches A
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    batch, grads = _batch(), []
    for ours in (True, False):
        model.zero_grad()
        if ours:
            total, count = token_loss_sum(model, batch)
            loss = total / count
        else:
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
        grads.append((float(loss.detach()), lora_a.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_packed_rows_through_the_own_logits_path():
    """Two examples packed in one row (position ids restart) score as they do apart, on the non-chunked path."""
    model, batch = _tiny_model("granite"), _batch(rows=2, length=20)
    packed = {
        "input_ids": batch["input_ids"].reshape(1, 40),
        "labels": batch["labels"].reshape(1, 40),
        "position_ids": batch["position_ids"].reshape(1, 40),
    }
    assert _ours(model, packed) == pytest.approx(_ours(model, batch), abs=1e-5)


@pytest.mark.parametrize("kind", ["llama", "granite"])  # the chunked head and the model's own logits
def test_loss_by_row_is_each_rows_own_loss(kind, monkeypatch):
    """Each row's loss equals transformers' loss of that row alone, and the rows add up to token_loss_sum: with
    chunks smaller than a row, so a row's targets are split across chunks (the index_add that joins them)."""
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", 7)
    model, batch = _tiny_model(kind), _batch(rows=3)
    sums, counts = loss_module.token_loss_by_row(model, batch)
    for r in range(3):
        alone = {k: v[r : r + 1] for k, v in batch.items()}
        assert int(counts[r]) == int((alone["labels"][:, 1:] != -100).sum())
        assert float(sums[r]) / int(counts[r]) == pytest.approx(_theirs(model, alone), abs=1e-5)
    with torch.no_grad():
        total, count = token_loss_sum(model, batch)
    assert float(sums.sum()) == pytest.approx(float(total), rel=1e-6) and int(counts.sum()) == count
