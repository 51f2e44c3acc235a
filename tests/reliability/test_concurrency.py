"""Two commands at once on one store: two sweeps of one sweep file on one experiment never train the same
configuration (a child's run is its claim; the earliest live claim trains it, children.claim), and commands
that create a new SQLite store at once all find it made (tracking._store_creation_lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import yaml

from lora_efficiency.children import Job, claim, run_job
from lora_efficiency.tracking import owner_tags
from tests.conftest import ROOT, subprocess_env, tiny_sweep_base
from tests.reliability.test_orphans import a_dead_pid


@pytest.mark.parametrize("sweeps", [2, 3])
def test_sweeps_claiming_one_configuration_train_it_once(store, sweeps):
    """Was: two `sweep` commands on one file and experiment trained every configuration twice (each sweep saw no
    FINISHED run of it when it started); then, with the earliest claim by start time winning, a claim stamped
    earlier but stored later also trained (CI, 2026-12-05). Here sweeps reach the same child at the same moment (a
    barrier), four times over: one claim trains, the others are withdrawn (their runs deleted) and name it."""
    experiment_id = store.create_experiment("reliability")
    for attempt in range(4):
        key = f"{attempt}" * 16
        job = Job("rank=8,seed=0", key, experiment_id, {"sweep_key": key}, "train: {}\n", {})
        trained, outcomes, start = [], [], threading.Barrier(sweeps)

        def launch(args, env, trained=trained):  # the child: holds its claim RUNNING for a second, and exits
            trained.append(env["MLFLOW_RUN_ID"])
            time.sleep(1)
            return 0, ""

        def sweep(job=job, start=start, outcomes=outcomes, launch=launch):
            start.wait()
            outcomes.append(run_job(job, launch))

        threads = [threading.Thread(target=sweep) for _ in range(sweeps)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(trained) == 1, (attempt, trained)
        lost = [o for o in outcomes if o.claimed_by]
        assert len(lost) == sweeps - 1 and {o.claimed_by for o in lost} == set(trained)
        runs = store.search_runs([experiment_id], filter_string=f"tags.sweep_key = '{key}'")
        assert [r.info.run_id for r in runs] == trained  # the losing claims withdrawn


def test_a_claim_stamped_earlier_but_stored_later_leaves_the_key_to_the_claim_it_sees(store):
    """The race CI met, made certain: a sweep's claim is stored and has seen no other (it trains); a second claim,
    stamped a second earlier by its host's clock, is stored after it. It sees the first and withdraws."""
    experiment_id = store.create_experiment("reliability")
    tags = {"sweep_key": "c" * 16, **owner_tags()}
    first = store.create_run(experiment_id, tags=tags)

    def stamped_earlier():
        return store.create_run(experiment_id, tags=tags, start_time=first.info.start_time - 1000)

    run, winner = claim(store, experiment_id, "c" * 16, stamped_earlier)
    assert run is None and winner == first.info.run_id
    assert [r.info.run_id for r in store.search_runs([experiment_id])] == [first.info.run_id]


def test_a_sweep_names_the_claim_that_stays_not_one_withdrawing(store, monkeypatch):
    """Was: a sweep that found live claims after its backoff named the earliest, which could be a claim about to
    be withdrawn beside the one that won (CI, 2026-12-05: three sweeps, the skipped ones named different runs).
    Here the earliest claim is deleted 0.3 s after the sweep's look, the other stays: the sweep names the one that
    stays."""
    import lora_efficiency.children as children

    monkeypatch.setattr(children, "CLAIM_BACKOFF_S", 0.01)
    experiment_id = store.create_experiment("reliability")
    tags = {"sweep_key": "d" * 16, **owner_tags()}
    winner = store.create_run(experiment_id, tags=tags)
    withdrawing = store.create_run(experiment_id, tags=tags, start_time=winner.info.start_time - 1000)
    timer = threading.Timer(0.3, store.delete_run, [withdrawing.info.run_id])
    timer.start()
    try:
        run, named = claim(store, experiment_id, "d" * 16, lambda: store.create_run(experiment_id, tags=tags))
    finally:
        timer.join()
    assert run is None and named == winner.info.run_id
    assert [r.info.run_id for r in store.search_runs([experiment_id])] == [winner.info.run_id]


def test_a_claim_whose_sweep_was_killed_is_released(store):
    experiment_id = store.create_experiment("reliability")
    dead = {**owner_tags(), "owner_pid": str(a_dead_pid())}
    store.create_run(experiment_id, tags={"sweep_key": "b" * 16, **dead})  # claimed by a sweep killed with -9
    job = Job("rank=8,seed=0", "b" * 16, experiment_id, {"sweep_key": "b" * 16}, "train: {}\n", {})
    outcome = run_job(job, lambda args, env: (0, ""))
    assert outcome.claimed_by == "" and outcome.run_id


def test_commands_creating_one_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Was: of two commands creating a new SQLite store at once, one failed ("table experiments already exists",
    "duplicate column") in 4 of 4 tries: MLflow creates a new store's tables with no lock."""
    uri = f"sqlite:///{tmp_path}/new.db"
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="new")
    check = "from lora_efficiency.tracking import check_tracking_store; check_tracking_store(); print('ok')"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", check], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    results = [(p.wait(timeout=120), p.stdout.read().decode(), p.stderr.read().decode()) for p in procs]
    assert all(code == 0 and out == "ok\n" for code, out, _ in results), [err[-600:] for _, _, err in results]


@pytest.mark.soak
def test_two_sweep_commands_at_once_train_each_configuration_once(store, tiny_model_dir, tiny_data_file, tmp_path):
    """The case end to end: two `sweep` commands on one file (3 configurations) and one experiment, started together
    on one SQLite store. Every configuration trained and FINISHED exactly once between them."""
    spec = {"name": "twice", "base": tiny_sweep_base(tiny_model_dir, tiny_data_file), "seeds": [0]}
    spec["base"] |= {"generate_samples": 0}
    spec["axes"] = {"rank": [2, 4, 8]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = subprocess_env(
        MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"], MLFLOW_EXPERIMENT_NAME="reliability", OMP_NUM_THREADS="1"
    )
    cmd = [sys.executable, "-m", "entrypoints.sweep", "--config", str(path)]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    experiment_id = store.get_experiment_by_name("reliability").experiment_id
    children = [r for r in store.search_runs([experiment_id]) if "sweep_key" in r.data.tags]
    keys = [r.data.tags["sweep_key"] for r in children]
    assert len(keys) == len(set(keys)) == 3 and {r.info.status for r in children} == {"FINISHED"}, outputs
    assert sum(o.count(" FINISHED in ") for o in outputs) == 3, outputs  # each trained by one sweep alone
