"""The report's winners in the Model Registry (a real SQLite store holding tests/report_store.py's study) and the
runs:/ and models:/ URIs that evaluate, generate and merge accept."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from lora_efficiency.errors import UserError
from lora_efficiency.inference import resolve_run_ref
from lora_efficiency.report import fetch_scope
from lora_efficiency.report.findings import group_configurations
from lora_efficiency.report.registry import register_winners
from tests.report_store import build_study

REPORT_RUN = "f" * 32


def _study(uri: str):
    """The known study; every train run but the bf16 ones logged an MLflow model (create_logged_model: the
    registry needs the entity, not the files)."""
    client = MlflowClient(uri)
    build_study(client, "study")
    experiment_id = client.get_experiment_by_name("study").experiment_id
    runs = fetch_scope(client, experiment="study").runs
    by_name = {r.name: r.run_id for r in runs}
    for r in runs:
        if r.params["quantization"] != "bf16":
            client.create_logged_model(experiment_id, name="model", source_run_id=r.run_id)
    return client, experiment_id, group_configurations(runs), by_name


@pytest.fixture
def study(sqlite_tracking):
    return _study(sqlite_tracking)


@pytest.fixture(scope="module")
def registered_store(tmp_path_factory):
    """One store (~5 s to build) for the tests that only read: the winners registered under 1,012 MB."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"
    mlflow.set_tracking_uri(uri)  # create_model_version looks the logged model up in the current store
    client, experiment_id, configs, by_name = _study(uri)
    register(client, experiment_id, configs, [1012])
    mlflow.set_tracking_uri(None)
    return uri, by_name


@pytest.fixture
def registered(registered_store, monkeypatch):
    uri, by_name = registered_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # resolve_run_ref reads the current tracking store
    mlflow.set_tracking_uri(uri)
    yield by_name
    mlflow.set_tracking_uri(None)


def register(client, experiment_id, configs, budgets):
    return register_winners(
        client, name="study", experiment_id=experiment_id, configs=configs, budgets_mb=budgets, report_run_id=REPORT_RUN
    )


def test_the_winners_are_versions_with_aliases_and_tags(study):
    client, experiment_id, configs, by_name = study
    done = register(client, experiment_id, configs, [1012, 2000])
    # bf16 (3.57) logged no model: r8 (3.60) wins overall and under 2,000 MB; under 1,012 MB only r4 fits
    # (r8's worst seed peaked at 1,015 MB); of each, the seed with the lowest perplexity (seed 0)
    assert {(r.alias, r.run_id) for r in done} == {
        ("best", by_name["r8-attention-nf4-s0"]),
        ("best-under-2000mb", by_name["r8-attention-nf4-s0"]),
        ("best-under-1012mb", by_name["r4-attention-nf4-s0"]),
    }
    model = client.get_registered_model("study")
    assert model.aliases == {"best": 1, "best-under-2000mb": 1, "best-under-1012mb": 2}
    assert model.tags["report_run_id"] == REPORT_RUN
    version = client.get_model_version_by_alias("study", "best")
    assert version.run_id == by_name["r8-attention-nf4-s0"]
    assert version.tags["report_run_id"] == REPORT_RUN and version.tags["mean_perplexity"] == "3.6000"
    assert len(version.tags["configuration_runs"].split(",")) == 3  # every seed of the configuration

    again = register(client, experiment_id, configs, [2000])  # a later report with other budgets
    assert len(client.search_model_versions("name='study'")) == 2  # the same runs keep their versions
    assert {r.alias for r in again} == {"best", "best-under-2000mb"}
    assert set(client.get_registered_model("study").aliases) == {"best", "best-under-2000mb"}  # stale one removed


def test_models_and_runs_uris_resolve_to_the_train_run(registered):
    by_name = registered
    best = by_name["r8-attention-nf4-s0"]
    assert resolve_run_ref("models:/study@best") == best
    assert resolve_run_ref("models:/study/2") == by_name["r4-attention-nf4-s0"]
    assert resolve_run_ref(f"runs:/{best}/model") == best
    assert resolve_run_ref(best) == best  # a plain id passes as it is


@pytest.mark.parametrize(
    "uri, message",
    [
        ("models:/nope@best", "run_id='models:/nope@best': no registered model 'nope'; registered models: study"),
        ("models:/study@worst", "run_id='models:/study@worst': 'study' has no alias 'worst'; its aliases: best "),
        ("models:/study/9", "run_id='models:/study/9': 'study' has no version 9; its versions: 1, 2"),
        ("runs:/{bf16}/model", "logged no model 'model'; its models: none"),
        ("runs:/{missing}/model", "no run " + "0" * 32),
    ],
)
def test_a_missing_name_alias_version_or_model_names_what_exists(registered, uri, message):
    by_name = registered
    uri = uri.format(bf16=by_name["r16-attention-bf16-s0"], missing="0" * 32)
    with pytest.raises(UserError) as error:
        resolve_run_ref(uri)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_without_any_logged_model_nothing_is_registered(sqlite_tracking):
    client = MlflowClient(sqlite_tracking)
    build_study(client, "study")
    runs = fetch_scope(client, experiment="study").runs
    experiment_id = client.get_experiment_by_name("study").experiment_id
    assert register(client, experiment_id, group_configurations(runs), [2000]) == []
    assert mlflow.search_registered_models() == []
