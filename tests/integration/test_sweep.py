"""run_sweep in this process (children still run as subprocesses): the memory warning and the progress bars."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import uuid

import mlflow
import yaml
from mlflow import MlflowClient

from lora_efficiency.models import load_tokenizer, resolve_model
from lora_efficiency.prepare import resolve_data
from lora_efficiency.sweep import load_sweep, run_sweep
from tests.conftest import ROOT, subprocess_env, tiny_sweep_base


def _one_child_sweep(tmp_path, tiny_model_dir, tiny_data_file, **base):
    spec = {"name": "tiny", "base": {**tiny_sweep_base(tiny_model_dir, tiny_data_file), **base}, "seeds": [0]}
    spec["axes"] = {"rank": [2]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_child_predicted_not_to_fit_is_announced_then_tried(
    mlflow_server, tiny_model_dir, tiny_data_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("PATH", subprocess_env()["PATH"])
    monkeypatch.setattr("lora_efficiency.planner.available_mb", lambda device: 1.0)  # a 1 MB machine
    mlflow.set_tracking_uri(mlflow_server)
    sweep = load_sweep(_one_child_sweep(tmp_path, tiny_model_dir, tiny_data_file))
    source = resolve_model(str(tiny_model_dir))
    prepared = resolve_data(str(tiny_data_file), model=source, tokenizer=load_tokenizer(source), seq_len=256)
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"sweep-warn-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment_id, run_name="sweep-tiny")
    lines: list[str] = []
    monkeypatch.chdir(ROOT)  # the children run `python -m entrypoints.train`
    result = run_sweep(
        sweep,
        parent_run_id=parent.info.run_id,
        data_fingerprint=prepared.manifest["fingerprint"],
        data_path=str(prepared.path),
        log=lines.append,
    )
    assert (result.finished, result.failed) == (1, 0)  # warned, tried, and it fit after all
    (warning,) = [line for line in lines if "warning" in line]
    assert "rank=2,seed=0 is predicted to need" in warning and "the device has 1 MB available" in warning
    (child,) = client.search_runs([experiment_id], filter_string="tags.sweep_name = 'tiny'")
    predicted = child.data.metrics["memory/predicted_peak_mb"]
    assert f"{predicted:,.0f} MB" in warning  # the trainer logs the figure the sweep warned with
    assert 0.3 < predicted / child.data.metrics["memory/peak_mb"] < 3  # tiny model: the baseline RSS dominates


def test_bars_on_a_terminal_lines_elsewhere(mlflow_server, tiny_model_dir, tiny_data_file, tmp_path):
    config = _one_child_sweep(tmp_path, tiny_model_dir, tiny_data_file, max_steps=3)
    cmd = [sys.executable, "-m", "entrypoints.sweep", "--config", str(config)]
    env = subprocess_env(MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_EXPERIMENT_NAME=f"bars-{uuid.uuid4().hex[:8]}")
    env.pop("LORA_EFFICIENCY_PROGRESS", None)

    main, follower = pty.openpty()  # stderr on a terminal of 120 columns (a new pty has 0: no room for a bar)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout = proc.communicate(timeout=300)[0].decode()
    os.close(main)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, terminal[-2000:]
    assert "sweep tiny: 100%" in terminal and "1/1" in terminal  # the sweep's bar, finished
    # the child's step bar (its last refresh may not show 3/3: tqdm redraws at most every 0.1 s, then clears it)
    assert "train:" in terminal and "/3 [" in terminal and "step/s" in terminal
    assert "step 1/3 |" not in stdout  # no step lines under a bar

    env["MLFLOW_EXPERIMENT_NAME"] += "-plain"  # stderr on a pipe (CI): plain lines, no bar
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 1/3 |" in proc.stdout and "[tiny] 1/1 done" in proc.stdout
    assert "\r" not in proc.stderr and "sweep tiny:" not in proc.stderr
