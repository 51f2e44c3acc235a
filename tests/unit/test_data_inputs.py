"""A prepared folder's splits as MLflow dataset inputs: names, digest and source per kind of origin."""

from __future__ import annotations

import json

import pytest

from lora_efficiency.tracking import data_inputs

MANIFEST = {
    "dataset": "alpaca-cleaned",
    "fingerprint": "0123456789abcdef",
    "train": {"count": 90},
    "eval": {"count": 10},
}


@pytest.mark.parametrize(
    "origin, source_type, source",
    [
        ("hub:yahma/alpaca-cleaned", "hugging_face", {"path": "yahma/alpaca-cleaned"}),
        ("bundled", "code", {"tags": {"origin": "bundled", "prepared_path": "/p"}}),
    ],
)
def test_each_split_is_a_dataset_with_the_fingerprint_as_digest(origin, source_type, source):
    found = data_inputs({**MANIFEST, "origin": origin}, "/p")
    assert [(d.name, d.digest, rows) for d, rows in found] == [
        ("alpaca-cleaned-train", "0123456789abcdef", 90),
        ("alpaca-cleaned-eval", "0123456789abcdef", 10),
    ]
    dataset = found[0][0]
    assert dataset.source._get_source_type() == source_type
    assert source.items() <= json.loads(dataset.source.to_json()).items()


def test_a_file_is_its_own_source(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("{}\n")
    ((dataset, rows),) = data_inputs({**MANIFEST, "origin": f"file:{path}"}, "/p", splits=("eval",))
    assert dataset.name == "alpaca-cleaned-eval" and rows == 10
    assert json.loads(dataset.source.to_json())["uri"] == str(path)
