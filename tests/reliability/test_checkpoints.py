"""Checkpoints every N steps and resume: the same loss curve as a run that was never interrupted (CPU)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from lora_efficiency.errors import UserError
from lora_efficiency.models import resolve_model
from lora_efficiency.trainer import train
from tests.conftest import ROOT, runs_of, subprocess_env

# grad_accum 2 and dropout: the batch order and the RNG must both resume; 6 steps x 2 x 2 rows crosses an epoch.
# bf16 for speed (nf4 gives the same equality, checked when this was written; it takes ~2x longer on the CPU).
SETTINGS = dict(
    max_steps=6,
    batch_size=2,
    grad_accum=2,
    seq_len=128,
    dropout=0.1,
    eval_samples=2,
    generate_samples=0,
    quantization="bf16",
    device="cpu",
)


def test_resumed_run_has_the_same_loss_per_step(tiny_model_dir, tiny_data_file, tmp_path):
    model = resolve_model(str(tiny_model_dir))
    whole = train(model=model, data=str(tiny_data_file), checkpoint_every=3, checkpoint_dir=tmp_path / "ck", **SETTINGS)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-000003", "step-000006"]
    saved = sorted(p.name for p in (tmp_path / "ck" / "step-000003").iterdir())
    assert saved == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer_rng.safetensors",
        "trainer_state.json",
    ]  # no pickle anywhere
    resumed = train(model=model, data=str(tiny_data_file), resume_from=tmp_path / "ck" / "step-000003", **SETTINGS)
    assert len(resumed.losses) == 6
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-5)
    assert resumed.metrics["eval/loss"] == pytest.approx(whole.metrics["eval/loss"], abs=1e-5)


def test_resume_with_other_settings_or_a_corrupt_checkpoint_is_refused(tiny_model_dir, tiny_data_file, tmp_path):
    model, three = resolve_model(str(tiny_model_dir)), {**SETTINGS, "max_steps": 3}
    train(model=model, data=str(tiny_data_file), checkpoint_every=3, checkpoint_dir=tmp_path, **three)
    with pytest.raises(UserError, match=r"resume_from=.* was trained with other settings .* resume with the same"):
        train(model=model, data=str(tiny_data_file), resume_from=tmp_path / "step-000003", **{**three, "rank": 4})
    (tmp_path / "step-000003" / "optimizer_rng.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(UserError, match=r"resume_from=.* is not a readable checkpoint"):
        train(model=model, data=str(tiny_data_file), resume_from=tmp_path / "step-000003", **three)


def _command(tiny_model_dir, tiny_data_file, **extra) -> list[str]:
    args = {**SETTINGS, "model": tiny_model_dir, "data": tiny_data_file, **extra}
    return [sys.executable, "-m", "entrypoints.train", *[x for k, v in args.items() for x in (f"--{k}", str(v))]]


def test_kill_9_then_resume_from_the_run_id(tiny_model_dir, tiny_data_file, tmp_path):
    """A training process killed with SIGKILL after its step-3 checkpoint; `resume_from=<its run id>` finishes
    steps 4-6 with the losses of an uninterrupted run."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="resume")
    cmd = _command(tiny_model_dir, tiny_data_file, checkpoint_every=3)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # step 4 has begun only after the step-3 checkpoint was logged
        if line.startswith("step 4/"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    client = MlflowClient(uri)
    (killed,) = runs_of(client, "resume")
    assert killed.info.status == "RUNNING"  # kill -9 cannot be caught (a sweep restart marks such runs FAILED)
    assert [f.path for f in client.list_artifacts(killed.info.run_id, "checkpoints")] == ["checkpoints/step-000003"]

    done = subprocess.run(
        _command(tiny_model_dir, tiny_data_file, resume_from=killed.info.run_id),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = next(r for r in runs_of(client, "resume") if r.info.run_id != killed.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.params["resume_from"] == killed.info.run_id
    # its settings file reruns it: the run it resumed from, not the temporary folder its checkpoint was fetched to
    settings = yaml.safe_load(
        Path(client.download_artifacts(resumed.info.run_id, "settings.yaml", tmp_path)).read_text()
    )
    assert settings["train"]["compute"]["resume_from"] == killed.info.run_id
    assert resumed.data.tags["resumed_from_step"] == "3"
    history = {m.step: m.value for m in client.get_metric_history(resumed.info.run_id, "train/loss")}
    assert sorted(history) == [4, 5, 6]

    whole = train(model=resolve_model(str(tiny_model_dir)), data=str(tiny_data_file), **SETTINGS)
    assert [history[s] for s in (4, 5, 6)] == pytest.approx(whole.losses[3:], abs=1e-5)
