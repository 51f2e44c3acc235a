"""prepare: the folder it writes, its cache, its split, and what train accepts as data."""

from __future__ import annotations

import json
import shutil

import pytest

from lora_efficiency import data as D
from lora_efficiency.errors import UserError
from lora_efficiency.models import load_tokenizer, resolve_model
from lora_efficiency.prepare import load_prepared, prepare_data, resolve_data


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir))
    return source, load_tokenizer(source)


def prep(model, dataset, **kw):
    source, tokenizer = model
    return prepare_data(dataset=dataset, model=source, tokenizer=tokenizer, **{"seq_len": 512, **kw})


def test_bundled_instruct_folder_and_manifest(model):
    prepared = prep(model, "")
    m = prepared.manifest
    assert (m["train"]["count"], m["eval"]["count"]) == (3000, 300)
    assert m["dataset"] == "instruct" and m["kind"] == "instruction" and m["has_references"] is True
    assert m["template"] == "chat template of the tokenizer"
    assert m["tokenizer"].startswith("tiny-llama") and len(m["fingerprint"]) == 16
    assert m["train"]["min"] <= m["train"]["median"] <= m["train"]["p95"] <= m["train"]["max"] <= 512
    assert m["packing"]["padding_fraction_packed"] < m["packing"]["padding_fraction_unpacked"]
    assert {p.name for p in prepared.path.iterdir()} == {"manifest.json", "train", "eval"}
    assert len(prepared.eval_examples) == 300 and prepared.eval_examples[0].response
    assert json.loads((prepared.path / "manifest.json").read_text()) == m


def test_the_same_inputs_never_tokenize_twice(model, monkeypatch):
    first = prep(model, "python-docs", seq_len=128)
    monkeypatch.setattr(D, "tokenize_texts", lambda *a, **k: pytest.fail("tokenized again"))
    second = prep(model, "python-docs", seq_len=128)
    assert second.cached and second.path == first.path
    assert second.manifest["fingerprint"] == first.manifest["fingerprint"]
    monkeypatch.undo()
    other = prep(model, "python-docs", seq_len=96)  # any setting changes the key
    assert other.path != first.path and not other.cached


def test_text_sets_are_all_targets_and_truncation_is_counted(model):
    prepared = prep(model, "python-docs", seq_len=64)
    m = prepared.manifest
    assert m["kind"] == "text" and m["template"] == "none (plain text)"
    assert m["train"]["truncated"] > 0 and m["train"]["max"] == 64
    ids, labels = prepared.train.input_ids[0], prepared.train.labels[0]
    assert labels[0] == D.IGNORE_INDEX and labels[1:] == ids[1:]


def test_split_is_seeded_deduplicated_and_disjoint(model, tmp_path):
    rows = [{"prompt": f"q{i % 50}", "response": f"a{i % 50}"} for i in range(100)]  # every record twice
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    a = prep(model, str(path), eval_fraction=0.2, seed=1)
    b = prep(model, str(path), eval_fraction=0.2, seed=2)
    held_out = {e.prompt for e in load_prepared(a.path).eval_examples}
    assert a.manifest["train"]["count"] + a.manifest["eval"]["count"] == 50
    assert a.manifest["eval"]["count"] == 10
    assert not {json.dumps(x) for x in a.train.input_ids} & {json.dumps(x) for x in a.eval.input_ids}
    assert held_out != {e.prompt for e in b.eval_examples}  # another seed, another split


def test_num_samples_caps_training_and_warns_when_too_large(model, tiny_data_file):
    capped = prep(model, str(tiny_data_file), num_samples=10)
    assert capped.manifest["train"]["count"] == 10 and not capped.manifest["warnings"]
    too_many = prep(model, str(tiny_data_file), num_samples=5000)
    assert too_many.manifest["train"]["count"] == 72
    assert "num_samples=5000 but 'tiny' has 72 training examples" in too_many.manifest["warnings"][0]


def test_nothing_usable_is_an_error(model, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    with pytest.raises(UserError, match="1 usable record"):
        prep(model, str(path))


def test_resolve_data_accepts_a_folder_and_checks_it_fits(model):
    source, tokenizer = model
    prepared = prep(model, "python-docs", seq_len=128)
    again = resolve_data(str(prepared.path), model=source, tokenizer=tokenizer, seq_len=256)
    assert again.manifest == prepared.manifest
    with pytest.raises(UserError, match="was prepared with seq_len=128, longer than seq_len=64"):
        resolve_data(str(prepared.path), model=source, tokenizer=tokenizer, seq_len=64)


def test_resolve_data_rejects_a_folder_made_for_another_tokenizer(model, tmp_path):
    source, tokenizer = model
    prepared = prep(model, "python-docs", seq_len=128)
    manifest = json.loads((prepared.path / "manifest.json").read_text())
    manifest["tokenizer"] = "someone/else@main"
    copy = tmp_path / "copy"
    shutil.copytree(prepared.path, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="was tokenized for someone/else@main, not for the model"):
        resolve_data(str(copy), model=source, tokenizer=tokenizer, seq_len=128)


def test_a_folder_without_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="is not a prepared data folder"):
        load_prepared(tmp_path)


def test_empty_data_means_the_bundled_set(model):
    source, tokenizer = model
    prepared = resolve_data("", model=source, tokenizer=tokenizer, seq_len=512)
    assert prepared.manifest["dataset"] == "instruct" and prepared.manifest["eval"]["count"] == 300
