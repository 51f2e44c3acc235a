from collections import Counter

import pytest
from transformers import AutoTokenizer

from lora_efficiency.data import (
    IGNORE_INDEX,
    Example,
    bundled_instruct,
    collate,
    fingerprint,
    pack,
    padding_fraction,
    tokenize,
    unpacked,
)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_bundled_set_sizes_families_and_no_leak():
    train, evaluation = bundled_instruct()
    assert (len(train), len(evaluation)) == (3000, 300)
    families = Counter(e.task for e in train)
    assert len(families) == 6 and min(families.values()) >= 450
    assert not {e.prompt for e in train} & {e.prompt for e in evaluation}
    assert bundled_instruct() == (train, evaluation)  # generated, not stored: same seed, same set


def test_bundled_answers_are_exact():
    train, _ = bundled_instruct(num_train=600, num_eval=0)
    for ex in train:
        if ex.task == "arithmetic":
            expr = ex.prompt.removeprefix("Compute ").split(".")[0]
            assert str(eval(expr)) == ex.response  # noqa: S307 - our own generated digits and + - *
        if ex.task == "sorting" and "ascending" in ex.prompt:
            numbers = [int(x) for x in ex.response.split(", ")]
            assert numbers == sorted(numbers)


def test_labels_cover_the_response_only(tokenizer):
    ex = Example("Compute 2 + 2. Answer with the number only.", "4")
    split = tokenize(tokenizer, [ex], seq_len=512)
    ids, labels = split.input_ids[0], split.labels[0]
    target = [t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX]
    assert tokenizer.decode(target) == "4<|im_end|>\n"
    assert tokenizer.decode(ids).startswith("<|im_start|>system")


def test_train_on_prompt_labels_everything_but_the_first_token(tokenizer):
    split = tokenize(tokenizer, [Example("Say hi.", "hi")], seq_len=512, train_on_prompt=True)
    assert split.labels[0][0] == IGNORE_INDEX
    assert split.labels[0][1:] == split.input_ids[0][1:]


def test_alpaca_template_without_a_chat_template(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    split = tokenize(tokenizer, [Example("Say hi.", "hi")], seq_len=512)
    assert "### Instruction:\nSay hi." in tokenizer.decode(split.input_ids[0])
    target = [t for t, y in zip(split.input_ids[0], split.labels[0], strict=True) if y != IGNORE_INDEX]
    assert tokenizer.decode(target) == "hi" + tokenizer.eos_token


def test_long_rows_are_truncated_and_counted(tokenizer):
    split = tokenize(tokenizer, [Example("x " * 300, "y"), Example("short", "y")], seq_len=64)
    assert split.num_truncated == 1
    assert max(len(x) for x in split.input_ids) == 64


def test_packing_keeps_every_token_and_restarts_positions(tokenizer):
    train, _ = bundled_instruct(num_train=40, num_eval=0)
    split = tokenize(tokenizer, train, seq_len=256)
    rows = pack(split, seq_len=256)
    assert all(len(r) <= 256 for r in rows.input_ids)
    assert sum(len(r) for r in rows.input_ids) == sum(len(x) for x in split.input_ids)
    restarts = sum(p.count(0) for p in rows.position_ids)
    assert restarts == len(split.input_ids)
    assert padding_fraction(rows, batch_size=4, fixed_length=256) < padding_fraction(unpacked(split), batch_size=4)


def test_collate_pads_with_ignored_labels():
    rows = unpacked(tokenize_stub())
    batch = collate(rows, [0, 1], pad_id=0, length=4)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1]
    assert collate(rows, [0, 1], pad_id=0)["input_ids"].shape == (2, 64)  # rounded up to PAD_MULTIPLE


def tokenize_stub():
    from lora_efficiency.data import TokenizedSplit

    return TokenizedSplit([[1, 2, 3], [4, 7]], [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 7]])


def test_fingerprint_changes_with_content():
    a = tokenize_stub()
    b = tokenize_stub()
    assert fingerprint(a) == fingerprint(b)
    b.labels[0][1] = IGNORE_INDEX
    assert fingerprint(a) != fingerprint(b)


def test_config_hash_groups_seeds_and_ignores_names():
    from lora_efficiency.trainer import config_hash

    a = {"rank": 8, "seed": 0, "data": "/a/x", "model": "/a/m", "base_model": "m", "data_fingerprint": "f"}
    assert config_hash(a) == config_hash({**a, "seed": 1, "data": "run-id", "model": "/b/m"})
    assert config_hash(a) != config_hash({**a, "rank": 16})
    assert config_hash(a) != config_hash({**a, "data_fingerprint": "g"})
