"""Which runs a report covers, read from a real (SQLite) tracking store through the runs API."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from lora_efficiency.errors import UserError
from lora_efficiency.report import fetch_scope
from tests.report_store import add_child, build_study


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store (~3 s of migrations once) holding the study of tests/report_store.py."""
    client = MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('report-store')}/mlflow.db")
    return client, build_study(client, "study")


def names(runs) -> list[str]:
    return sorted(r.name for r in runs)


def test_the_latest_study_run_and_its_descendants(store):
    client, ids = store
    scope = fetch_scope(client, experiment="study")
    assert scope.root.run_id == ids["study"]
    assert len(scope.runs) == 12 and {r.params["rank"] for r in scope.runs} == {"4", "8", "16"}
    assert [r.tags["sweep_configuration"] for r in scope.failed] == ["quantization=fp4,seed=0"]
    assert [b.tags["quantization"] for b in scope.baselines] == ["nf4"]
    assert sorted(r.tags["sweep_name"] for r in scope.sweeps) == ["quantization", "rank"]


def test_a_sweep_gets_back_what_it_skipped_from_the_other_sweep(store):
    client, ids = store
    scope = fetch_scope(client, experiment="study", sweep_run_id=ids["quantization"])
    # its own bf16 runs, and the nf4 r16 runs the rank sweep trained (skipped here); not r4 or r8
    assert names(scope.runs) == [f"r16-attention-{q}-s{s}" for q in ("bf16", "nf4") for s in range(3)]
    assert any("joined" in note for note in scope.notes)
    rank = fetch_scope(client, experiment="study", sweep_run_id=ids["rank"])
    assert {r.params["quantization"] for r in rank.runs} == {"nf4"} and len(rank.runs) == 9


def test_nothing_to_report_is_a_one_line_user_error(store):
    client, _ = store
    client.create_experiment("empty")
    with pytest.raises(UserError, match="experiment 'empty' has no FINISHED training runs to report"):
        fetch_scope(client, experiment="empty")
    failed = client.create_experiment("failed-only")
    study = client.create_run(failed, run_name="study", tags={"entry_point": "main"}).info.run_id
    add_child(client, failed, study, "fp4", 0, status="FAILED")
    with pytest.raises(UserError, match=r"all 1 training runs FAILED, nothing to report \(first error: killed"):
        fetch_scope(client, experiment="failed-only")
    with pytest.raises(UserError, match="experiment='nope' does not exist: known experiments are"):
        fetch_scope(client, experiment="nope")
    with pytest.raises(UserError, match="is not a run of experiment 'study'"):
        fetch_scope(client, experiment="study", sweep_run_id="0" * 32)


def test_a_resumed_tuned_study_gets_back_every_configuration_its_first_try_finished(tmp_path):
    # A study resumed after three runs were deleted trains only those (here r16 nf4, at its own tuned lr): the
    # configurations it skipped differ in what its own runs hold fixed (quantization, lr), so only the sweep
    # run's sweep_axes tag tells the report they belong to it.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("resumed")
    ids = {}
    for attempt, names in (("first", ("r16", "bf16")), ("second", ("r16",))):
        study = client.create_run(experiment, run_name=f"study-{attempt}", tags={"entry_point": "main"}).info.run_id
        sweep = client.create_run(
            experiment,
            run_name="sweep-standard",
            tags={"mlflow.parentRunId": study, "entry_point": "sweep", "sweep_axes": "lr,quantization,rank"},
        ).info.run_id
        ids[attempt] = [
            add_child(client, experiment, sweep, name, seed, lr=3e-3 if name == "r16" else 3e-4)
            for name in names
            for seed in range(3)
        ]
        for run in (sweep, study):
            client.set_terminated(run, "FINISHED")
    scope = fetch_scope(client, experiment="resumed")  # the latest study run: the second
    assert sorted(r.run_id for r in scope.runs) == sorted(ids["second"] + ids["first"][3:])
    assert {r.params["lr"] for r in scope.runs} == {"0.003", "0.0003"}
