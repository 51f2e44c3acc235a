"""A sweep across a two-node Ray cluster: a head and a worker started as two separate `ray start` processes on this
machine (one CPU each), the sweep joining them by address, every child logging to one MLflow server.

The commands are the ones docs/scaling.md gives for a real cluster; only the addresses differ.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import _free_port, mlflow_run, runs_of, subprocess_env, tiny_sweep_base

pytestmark = pytest.mark.e2e
# Ray 2.60 turns on token authentication when a head starts; every node and the driver must carry the token.
NODE_FLAGS = ["--block", "--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]


def _ray_start(args: list[str], env: dict[str, str], log) -> subprocess.Popen:
    """`ray start --block ...` in a process group of its own: ending the group ends that node."""
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, *NODE_FLAGS]
    return subprocess.Popen(ray, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    probe = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the node's process group, SIGKILL after 5 s (a node drains for up to 30 s on SIGTERM)."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@pytest.fixture
def two_node_cluster(tmp_path, monkeypatch):
    """The head, then a worker that joins it; yields the address once both nodes are alive."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    env = subprocess_env()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    log = (tmp_path / "ray-nodes.log").open("w")
    nodes = [
        _ray_start(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false"], env, log)
    ]
    try:
        deadline = time.monotonic() + 90
        while _alive_nodes(address, env) < 1 and time.monotonic() < deadline:
            time.sleep(2)
        nodes.append(_ray_start([f"--address={address}", "--node-ip-address=127.0.0.1"], env, log))
        while (alive := _alive_nodes(address, env)) < 2 and time.monotonic() < deadline:
            time.sleep(2)
        assert alive == 2, (tmp_path / "ray-nodes.log").read_text()[-3000:]
        yield address
    finally:
        for node in reversed(nodes):
            _stop(node)
        log.close()


def test_a_sweep_on_two_ray_nodes_runs_children_on_both(
    two_node_cluster, mlflow_server, tiny_model_dir, tiny_data_file, tmp_path
):
    config = tmp_path / "two-nodes.yaml"
    spec = {"name": "two-nodes", "base": tiny_sweep_base(tiny_model_dir, tiny_data_file), "seeds": [0]}
    config.write_text(yaml.safe_dump({**spec, "axes": {"rank": [2, 4]}}))
    experiment = f"ray-nodes-{uuid.uuid4().hex[:8]}"
    params = {"config": config, "backend": "ray", "ray_address": two_node_cluster, "cpus_per_trial": 1}
    done = mlflow_run(mlflow_server, experiment, params, entry_point="sweep")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"[ray] {two_node_cluster}: 2 CPUs" in done.stdout
    children = [r for r in runs_of(MlflowClient(mlflow_server), experiment) if "sweep_key" in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    # one CPU per node and one CPU per child: the two children ran at once, so on the two nodes
    assert len({r.data.tags["ray_node_id"] for r in children}) == 2
    assert all(r.data.metrics["eval/loss"] > 0 for r in children)
