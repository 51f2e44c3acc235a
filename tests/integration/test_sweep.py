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
from pathlib import Path
from types import SimpleNamespace

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


def test_a_grid_runs_pilots_then_the_main_runs_at_the_chosen_rate_and_a_restart_reuses_them(
    mlflow_server, tiny_model_dir, tiny_data_file, tmp_path, monkeypatch
):
    """Two learning rates: two pilots (tagged pilot, 2 steps, first seed), then the main run at the rate whose pilot
    ended with the lower val/loss (eval/loss while the trainer logs no val/loss). Started again with a second seed,
    the sweep skips both FINISHED pilots, chooses the same rate from their runs, and trains only the new seed."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("PATH", subprocess_env()["PATH"])
    mlflow.set_tracking_uri(mlflow_server)
    base = {**tiny_sweep_base(tiny_model_dir, tiny_data_file), "max_steps": 3, "generate_samples": 0}
    base["val_samples"] = 4  # the last 4 of the 8 held-out examples; eval_samples takes the first 4
    spec = {"name": "tuned", "base": base, "axes": {"rank": [2]}, "seeds": [0], "lr_grid": [1e-4, 5e-2]}
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump({**spec, "pilot_steps": 2}))
    sweep = load_sweep(path)
    assert sweep.pilots == 2
    source = resolve_model(str(tiny_model_dir))
    prepared = resolve_data(str(tiny_data_file), model=source, tokenizer=load_tokenizer(source), seq_len=256)
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"sweep-lr-{uuid.uuid4().hex[:8]}")
    monkeypatch.chdir(ROOT)  # the children run `python -m entrypoints.train`

    def run(sweep):
        parent = client.create_run(experiment_id, run_name=f"sweep-{sweep.name}")
        lines: list[str] = []
        result = run_sweep(
            sweep,
            parent_run_id=parent.info.run_id,
            data_fingerprint=prepared.manifest["fingerprint"],
            data_path=str(prepared.path),
            log=lines.append,
        )
        return result, lines

    result, lines = run(sweep)
    assert (result.total, result.finished, result.failed, result.pilots_failed) == (3, 3, 0, 0), lines
    runs = client.search_runs([experiment_id], filter_string="tags.sweep_name = 'tuned'")
    pilots = [r for r in runs if r.data.tags.get("sweep_role") == "pilot"]
    (main,) = [r for r in runs if r.data.tags.get("sweep_role") == "main"]
    assert sorted(float(p.data.params["lr"]) for p in pilots) == [1e-4, 5e-2]
    assert all(p.data.params["max_steps"] == "2" and p.data.params["seed"] == "0" for p in pilots)
    group = main.data.tags["lr_group"]
    assert {p.data.tags["lr_group"] for p in pilots} == {group}
    assert main.data.tags["lr_tuned"] == "true" and main.data.tags["lr_chosen_from"] == "0.0001,0.05"
    metric = main.data.tags["lr_selected_by"]
    assert metric == ("val/loss" if all("val/loss" in p.data.metrics for p in pilots) else "eval/loss")
    best = min(pilots, key=lambda p: (p.data.metrics[metric], float(p.data.params["lr"])))
    assert float(main.data.params["lr"]) == float(best.data.params["lr"]) and main.data.params["max_steps"] == "3"
    assert any(f"lr={best.data.params['lr']} chosen from 0.0001,0.05 by {metric}=" in line for line in lines), lines

    path.write_text(yaml.safe_dump({**spec, "seeds": [0, 1], "pilot_steps": 2}))  # a second seed, then again
    result, lines = run(load_sweep(path))
    assert (result.total, result.skipped, result.finished, result.failed) == (4, 3, 1, 0), lines
    assert sum("pilot already FINISHED" in line for line in lines) == 2, lines
    runs = client.search_runs([experiment_id], filter_string="tags.sweep_name = 'tuned'")
    assert sum(r.data.tags.get("sweep_role") == "pilot" for r in runs) == 2  # no pilot ran twice
    mains = [r for r in runs if r.data.tags.get("sweep_role") == "main"]
    assert sorted(r.data.params["seed"] for r in mains) == ["0", "1"]
    assert {r.data.params["lr"] for r in mains} == {main.data.params["lr"]}
    assert {r.data.tags["lr_group"] for r in mains} == {group}

    # the report: pilots are no configuration; its section "Learning rates" tables them and marks the choice
    from lora_efficiency.report.lr import lr_section, pilots_in_scope
    from lora_efficiency.report.runs import fetch_loss_curves, fetch_scope

    scope = fetch_scope(client, experiment=client.get_experiment(experiment_id).name)
    assert sorted(r.run_id for r in scope.runs) == sorted(r.info.run_id for r in mains)
    assert len(pilots_in_scope(scope)) == 2
    curves = fetch_loss_curves(client, scope.runs + pilots_in_scope(scope))
    blocks = lr_section(SimpleNamespace(scope=scope, loss_curves=curves))
    (table,) = [b for b in blocks if b[0] == "table"]
    chosen = [row for row in table[2] if row[5].startswith("chosen")]
    assert [row[1] for row in chosen] == [main.data.params["lr"]] and "(step 2)" in chosen[0][4]


def test_run_job_launches_the_child_with_its_settings_file_only(sqlite_tracking):
    """The child's command line is `--config <file>`; the file exists while the child runs, and is gone after."""
    import mlflow

    from lora_efficiency.children import Job, run_job

    experiment_id = mlflow.MlflowClient().create_experiment("child-args")
    seen = {}

    def launch(args, env):
        seen["args"], seen["text"] = args, Path(args[1]).read_text(encoding="utf-8")
        return 0, ""

    outcome = run_job(Job("c", "k", experiment_id, {}, "train:\n  rank: 8\n", {}), launch)
    assert outcome.returncode == 0 and seen["text"] == "train:\n  rank: 8\n"
    assert seen["args"][0] == "--config" and seen["args"][1].endswith("/settings.yaml") and len(seen["args"]) == 2
    assert not Path(seen["args"][1]).exists()
