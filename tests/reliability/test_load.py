"""N concurrent training processes logging to one real `mlflow server` (SQLite backend, 127.0.0.1): every run
FINISHED, every step of every metric present (rows counted in the SQLite file), no "database is locked".

make soak                                        # N = 8 (and 16), ~2-4 min on a 2-core machine
LOAD_N=24 .venv/bin/python -m pytest -q -m soak tests/reliability/test_load.py -k env   # any N
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, runs_of, subprocess_env
from tests.conftest import MlflowServer as Server
from tests.reliability.test_faults import STEP_METRICS, steps_in_store

STEPS = 20


def concurrent_runs(n: int, root, tiny_model_dir, tiny_data_file, workers: int = 4) -> dict:
    """Start a server, n training processes at once; returns what the store holds and the wall time."""
    server = Server(root, workers=workers)
    root.mkdir()
    server.start()
    try:
        env = subprocess_env(MLFLOW_TRACKING_URI=server.uri, MLFLOW_EXPERIMENT_NAME=f"load-{n}", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "entrypoints.train", "--model", str(tiny_model_dir), "--data", str(tiny_data_file)]
        cmd += ["--max_steps", str(STEPS), "--batch_size", "2", "--seq_len", "128", "--eval_samples", "2"]
        cmd += ["--generate_samples", "0", "--device", "cpu"]
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        errors = [p.communicate(timeout=1800)[1] for p in procs]
        wall = time.perf_counter() - t0
        runs = runs_of(MlflowClient(server.uri), f"load-{n}")
        return {
            "codes": [p.returncode for p in procs],
            "errors": [e[-1500:] for e, p in zip(errors, procs, strict=True) if p.returncode],
            "statuses": sorted(r.info.status for r in runs),
            "counts": [steps_in_store(server.db, r.info.run_id) for r in runs],
            "locked": "database is locked" in server.log_text() + "".join(errors),
            "wall_s": wall,
        }
    finally:
        server.stop()


def check(result: dict, n: int) -> None:
    print(f"N={n}: {result['wall_s']:.0f} s, statuses {result['statuses']}, locked {result['locked']}")
    assert result["codes"] == [0] * n, result["errors"]
    assert result["statuses"] == ["FINISHED"] * n
    for counts in result["counts"]:
        assert all(counts.get(key) == STEPS for key in STEP_METRICS), counts
    assert not result["locked"]


def test_eight_concurrent_runs(tiny_model_dir, tiny_data_file, tmp_path):
    """N = 8 in `make test` (~50 s here); the soak tests below take N = 16 and 32."""
    check(concurrent_runs(8, tmp_path / "server", tiny_model_dir, tiny_data_file), 8)


@pytest.mark.soak
@pytest.mark.parametrize("n", [16, 32])
def test_n_concurrent_runs(n, tiny_model_dir, tiny_data_file, tmp_path):
    check(concurrent_runs(n, tmp_path / "server", tiny_model_dir, tiny_data_file), n)


@pytest.mark.soak
def test_n_from_env(tiny_model_dir, tiny_data_file, tmp_path):
    n = int(os.environ.get("LOAD_N", "8"))
    check(concurrent_runs(n, tmp_path / "server", tiny_model_dir, tiny_data_file), n)
