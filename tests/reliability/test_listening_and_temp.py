"""Servers and rendezvous on loopback unless a setting asks for more (`make ui`, DDP's sockets, Ray's local node);
temporary files of a command removed when it ends, also when it fails, and those of a killed command by the next."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest

from entrypoints import train as train_entry
from lora_efficiency import distributed
from tests.conftest import ROOT
from tests.reliability.conftest import assert_one_line_error, run_entry_point, statuses

TINY = ["--batch_size", "2", "--seq_len", "128", "--eval_samples", "2", "--generate_samples", "0", "--device", "cpu"]


def ui_host(*args: str, **env: str) -> str:
    out = subprocess.run(
        ["make", "-n", "-o", ".venv/.setup-done", "ui", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )
    (line,) = [ln for ln in out.stdout.splitlines() if "mlflow ui" in ln]
    return line.split("--host ")[1].split()[0]


def test_make_ui_ignores_a_host_exported_for_another_reason():
    """Was `HOST ?= 127.0.0.1`: an exported HOST (set by a shell profile, a container) opened the UI."""
    assert ui_host(HOST="0.0.0.0") == "127.0.0.1"
    assert ui_host("HOST=0.0.0.0") == "0.0.0.0"  # the command line asks for it


def test_ddp_sockets_go_on_loopback_unless_an_interface_is_chosen(monkeypatch):
    import accelerate.commands.launch as accelerate_launch

    seen = {}
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: seen.update(dict(os.environ), args=args))
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    distributed.launch(2, "entrypoints.train", [])
    loopback = distributed.loopback_interface()
    assert seen["GLOO_SOCKET_IFNAME"] == seen["NCCL_SOCKET_IFNAME"] == loopback
    assert seen["args"].num_machines == 1  # torchrun's MASTER_ADDR is then 127.0.0.1
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    distributed.launch(2, "entrypoints.train", [])
    assert seen["GLOO_SOCKET_IFNAME"] == "eth7"  # the caller's choice stands


def test_a_two_rank_launch_listens_on_loopback_only(tmp_path, monkeypatch):
    """torchrun's rendezvous store listened on `::` (every interface) before `_loopback_store`."""
    import json

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", distributed.loopback_interface())
    out = tmp_path / "listening.json"
    distributed.launch(2, "tests.reliability.listeners_probe", [str(out)])
    seen = json.loads(out.read_text())
    assert [a for a, *_ in seen["listening"] if a != "127.0.0.1"] == [], seen
    assert seen["store_port"] in {port for _, port, _ in seen["listening"]}, seen  # the store itself was seen
    assert len({pid for *_, pid in seen["listening"]}) >= 2, seen  # and the ranks' own (gloo) sockets


def test_loopback_interface_holds_127_0_0_1():
    import psutil

    addresses = psutil.net_if_addrs()[distributed.loopback_interface()]
    assert any(a.address == "127.0.0.1" for a in addresses)


def test_a_local_ray_node_announces_loopback_and_a_cluster_is_asked_for(monkeypatch):
    ray = pytest.importorskip("ray")
    from lora_efficiency import ray_backend

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    ray_backend._connect("")
    ray_backend._connect("ray://head:10001")
    assert calls[0]["_node_ip_address"] == "127.0.0.1" and calls[0]["include_dashboard"] is False
    assert "_node_ip_address" not in calls[1] and calls[1]["address"] == "ray://head:10001"


@pytest.fixture
def temp_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_temporary_files_are_removed_when_a_run_ends(store, temp_root, tiny_model_dir, tiny_data_file, capsys):
    """Was: every run left its adapter, its checkpoint folder and (resumed) its downloaded checkpoint in /tmp."""
    argv = ["--model", tiny_model_dir, "--data", tiny_data_file, *TINY, "--max_steps", "2", "--checkpoint_every", "1"]
    code, _, err = run_entry_point(train_entry.main, argv, capsys)
    assert code == 0, err[-2000:]
    assert list(temp_root.iterdir()) == []
    first = store.search_runs([store.get_experiment_by_name("reliability").experiment_id])[0].info.run_id
    code, _, err = run_entry_point(train_entry.main, [*argv, "--resume_from", first], capsys)  # downloads it
    assert code == 0, err[-2000:]
    assert list(temp_root.iterdir()) == []


def test_temporary_files_are_removed_when_a_run_fails(
    store, temp_root, tiny_model_dir, tiny_data_file, monkeypatch, capsys
):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlflow, "log_artifacts", full)
    argv = ["--model", tiny_model_dir, "--data", tiny_data_file, *TINY, "--max_steps", "2"]
    code, _, err = run_entry_point(train_entry.main, argv, capsys)
    assert_one_line_error(code, err, "No space left on device")
    assert list(temp_root.iterdir()) == [] and statuses(store) == ["FAILED"]


def test_a_killed_commands_temporary_folder_is_removed_by_the_next(temp_root, capsys):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    left = temp_root / f"lora-efficiency-{proc.pid}-abc123"
    (left / "adapter-x").mkdir(parents=True)
    alive = temp_root / f"lora-efficiency-{os.getpid()}-def456"  # a live process's: not touched
    alive.mkdir()
    code, _, _ = run_entry_point(lambda argv: None, [], capsys)
    assert code == 0 and not left.exists() and alive.exists()
