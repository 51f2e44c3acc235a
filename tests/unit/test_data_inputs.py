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


def test_a_dataset_another_run_inserted_meanwhile_is_linked_not_an_error(sqlite_tracking, monkeypatch):
    """The race of tests/reliability/test_load.py made certain: the store's lookup of existing datasets misses
    the row another run already wrote, so the real insert fails on the real UNIQUE constraint; the run still
    gets its two inputs, linked to the one dataset row."""
    import mlflow
    from mlflow.store.tracking import sqlalchemy_store
    from sqlalchemy.orm import Query

    from lora_efficiency.tracking import MlflowTracker

    manifest = {**MANIFEST, "origin": "bundled"}
    mlflow.set_experiment("race")  # this test's store: not an experiment id another test left active
    with mlflow.start_run() as first:
        MlflowTracker(first.info.run_id).log_data_inputs(manifest, "/p")
    real_impl, real_all, missed = sqlalchemy_store.SqlAlchemyStore._log_inputs_impl, Query.all, []

    def lookup_misses_once(query):
        if not missed and query.column_descriptions[0]["entity"] is sqlalchemy_store.SqlDataset:
            missed.append(True)
            return []
        return real_all(query)

    def impl(self, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(Query, "all", lookup_misses_once)
            return real_impl(self, *args, **kwargs)

    monkeypatch.setattr(sqlalchemy_store.SqlAlchemyStore, "_log_inputs_impl", impl)
    with mlflow.start_run() as second:
        MlflowTracker(second.info.run_id).log_data_inputs(manifest, "/p")
    assert missed == [True]
    inputs = mlflow.get_run(second.info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["alpaca-cleaned-eval", "alpaca-cleaned-train"]
    first_inputs = mlflow.get_run(first.info.run_id).inputs.dataset_inputs
    assert {i.dataset.digest for i in inputs} == {i.dataset.digest for i in first_inputs}


def test_other_store_errors_are_not_retried(sqlite_tracking, monkeypatch):
    import mlflow

    from lora_efficiency.tracking import MlflowTracker

    calls = []

    def failing(**kwargs):
        calls.append(kwargs)
        raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) attempt to write a readonly database")

    monkeypatch.setattr(mlflow, "log_inputs", failing)
    mlflow.set_experiment("no-retry")
    with mlflow.start_run() as run, pytest.raises(mlflow.exceptions.MlflowException, match="readonly"):
        MlflowTracker(run.info.run_id).log_data_inputs({**MANIFEST, "origin": "bundled"}, "/p")
    assert len(calls) == 1
