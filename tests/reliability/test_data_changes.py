"""Silent data changes: a field that is not text, a column of another type, a broken line, a YAML key given twice,
a sweep far larger than meant. Each is an error that names the line, row, column or key; nothing is converted
to a Python repr or dropped without a word."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lora_efficiency.config import TrainConfig, load_yaml, parse_args
from lora_efficiency.errors import UserError
from lora_efficiency.sources import load_source
from lora_efficiency.sweep import MAX_RUNS_UNASKED, load_profile, load_sweep


def user_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as err:
        call(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    "value", [{"name": "x"}, ["a", "b"], 42, 4.5, True], ids=["dict", "list", "int", "float", "bool"]
)
def test_a_jsonl_field_that_is_not_text_names_its_line_and_column(value, tmp_path):
    """One bad row among good ones: was str(value) (JSON answers came out as "{'name': ...}" in the split)."""
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)]
    rows.insert(2, {"prompt": "q", "response": value})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = user_error(load_source, str(path))
    assert f"line 3, column 'response' holds {type(value).__name__}" in message and "not text" in message


def test_a_json_list_names_the_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": ["x"], "response": "c"}], indent=2))
    assert "record 2, column 'prompt' holds list" in user_error(load_source, str(path))


def test_named_columns_and_text_columns_are_checked_too(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a", "r": "b"}\n{"q": "c", "r": 7}\n')
    assert "line 2, column 'r' holds int" in user_error(load_source, str(path), prompt_field="q", response_field="r")
    path.write_text('{"text": "a"}\n{"text": {"t": 1}}\n')
    assert "line 2, column 'text' holds dict" in user_error(load_source, str(path))


@pytest.mark.parametrize(
    "column, kind",
    [
        ([1, 2, 3], "int"),
        ([[1], [2], [3]], "list"),
        ([{"a": 1}, {"a": 2}, {"a": 3}], "dict"),
        ([1.5, 2.5, 3.5], "float"),
    ],
    ids=["int", "list", "struct", "float"],
)
def test_parquet_columns_of_another_type_name_the_row_and_column(column, kind, tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": ["a", "b", "c"], "response": column}).to_parquet(path)
    assert f"row 1, column 'response' holds {kind}" in user_error(load_source, str(path))


def test_unused_columns_of_other_types_are_left_alone(tmp_path):
    """Only the columns the schema reads must be text: an `id` or `score` column does not stop a file."""
    path = tmp_path / "d.parquet"
    pd.DataFrame({"id": [1, 2], "prompt": ["a", "b"], "response": ["x", "y"], "score": [0.5, 0.1]}).to_parquet(path)
    assert [e.response for e in load_source(str(path)).examples] == ["x", "y"]


def test_csv_cells_stay_the_text_they_are(tmp_path):
    """pandas' type guess turned "007" into 7 and "NA" into a missing value; cells now reach the split as written."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,response\nagent?,007\nsodium?,NA\ncount?,"1,200"\n')
    assert [e.response for e in load_source(str(path)).examples] == ["007", "NA", "1,200"]


@pytest.mark.parametrize(
    "content, where",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "e", "resp\n', "line 3"),
        ('{"prompt": "a", "response": "b"}\n\n\n{"prompt": "c" "response": "d"}\n', "line 4"),
        ('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c", "response": }\n]\n', "line 3, column 31"),
    ],
    ids=["jsonl-truncated", "jsonl-after-blank-lines", "json-document"],
)
def test_a_broken_json_line_is_reported_with_its_number(content, where, tmp_path):
    path = tmp_path / ("d.json" if content.startswith("[") else "d.jsonl")
    path.write_text(content)
    message = user_error(load_source, str(path))
    assert where in message and "JSON" in message, message


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "d.jsonl",
            '{"prompt": "a", "response": "b"}\n{"prompt": "c", "prompt": "d", "response": "e"}\n',
            "line 2 gives",
        ),
        ("d.jsonl", '{"prompt": "c", "response": "d", "response": "e"}\n', "line 1 gives the key 'response'"),
        ("d.json", '[{"prompt": "a", "response": "b", "prompt": "x"}]', "a record gives the key 'prompt' twice"),
    ],
)
def test_a_key_given_twice_in_a_data_record_is_an_error(name, content, message, tmp_path):
    """json keeps the last of duplicate keys silently: the record would train on "d" and never say so."""
    path = tmp_path / name
    path.write_text(content)
    assert message in user_error(load_source, str(path))


@pytest.mark.parametrize(
    "content, key",
    [
        ("axes:\n  rank: [4]\n  rank: [8]\n  rank: [16]\n", "'rank' is given twice, on lines 2 and 3"),
        ("axes: {rank: [4]}\nseeds: [0]\nseeds: [1]\n", "'seeds' is given twice, on lines 2 and 3"),
        ("base: {lr: 1.0e-4, lr: 2.0e-4}\naxes: {rank: [4]}\n", "'lr' is given twice"),
        ("configurations:\n  - {rank: 4, rank: 8}\n", "'rank' is given twice"),
    ],
)
def test_a_key_given_twice_in_a_sweep_file_is_an_error(content, key, tmp_path):
    """yaml.safe_load keeps the last of duplicate keys silently: 1 configuration ran instead of 3."""
    path = tmp_path / "sweep.yaml"
    path.write_text(content)
    message = user_error(load_sweep, path)
    assert key in message and "could not be read as YAML" in message


def test_a_key_given_twice_in_the_defaults_file_is_an_error(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("train:\n  rank: 4\n  rank: 8\n")
    assert "'rank' is given twice, on lines 2 and 3" in user_error(
        parse_args, TrainConfig, "train", ["--defaults", str(path)], ""
    )
    assert load_yaml("a: 1\nb: {a: 2}\n") == {"a": 1, "b": {"a": 2}}  # the same key in other mappings is fine


def test_profiles_go_through_the_same_loader():
    for name in ("quick", "standard", "full"):
        assert isinstance(load_profile(name), dict)


def test_a_sweep_above_the_stated_size_asks_for_max_runs(tmp_path):
    path = tmp_path / "sweep.yaml"
    ranks, rates = ",".join(map(str, range(1, 101))), ",".join(f"{i}.0e-4" for i in range(1, 101))
    path.write_text(f"axes: {{rank: [{ranks}], lr: [{rates}]}}\nseeds: [0, 1]\n")
    message = user_error(load_sweep, path)
    assert "expands to 20,000 runs" in message and f"more than {MAX_RUNS_UNASKED}" in message
    assert "set max_runs: 20000 in the file" in message
    path.write_text(f"axes: {{rank: [{ranks}], dropout: [0.0, 0.1]}}\nseeds: [0]\nmax_runs: 150\n")
    assert "expands to 200 runs (configurations x seeds), max_runs=150" in user_error(load_sweep, path)
    path.write_text(f"axes: {{rank: [{ranks}], dropout: [0.0, 0.1, 0.2]}}\nseeds: [0]\nmax_runs: 300\n")
    assert len(load_sweep(path).children) == 300  # stated: it runs
    path.write_text("axes: {rank: [4]}\nmax_runs: many\n")
    assert "max_runs='many' is invalid" in user_error(load_sweep, path)


def test_a_grid_too_large_to_build_is_refused_at_once(tmp_path):
    """10 axes of 100 values: 10^20 configurations; the size is checked before the product is built."""
    axes = "\n".join(f"  a{i}: [{','.join(map(str, range(100)))}]" for i in range(10))
    path = tmp_path / "sweep.yaml"
    path.write_text(f"axes:\n{axes}\n")
    assert "expands to 100,000,000,000,000,000,000 runs" in user_error(load_sweep, path)


def test_configuration_lists_count_too(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("configurations:\n" + "".join(f"  - {{rank: {i}}}\n" for i in range(1, 202)))
    assert "expands to 201 runs" in user_error(load_sweep, path)
