"""The second run of a sweep: how long `python -m entrypoints.train`, launched as a sweep launches a child, takes
from its start to its first training step, and how much of that is imports."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from lora_efficiency.bench.figures import import_times
from lora_efficiency.bench.recipe import model_path
from lora_efficiency.bench.workers import worker_env
from lora_efficiency.subprocesses import ROOT, die_with_parent


def measure_startup(
    *,
    model: str,
    data_path: str,
    mode: str,
    batch_size: int,
    seq_len: int,
    device: str,
    launches: int,
    work: Path,
    log=print,
) -> dict:
    """Launch `python -m entrypoints.train` exactly as a sweep launches a child (its command, an MLflow run made
    for it, the prepared data folder) `launches` times, and read each launch's `time/startup_s` back from its run:
    the trainer's seconds from the process's start to the start of its first step. The first launch may meet
    cold caches; the later ones are the "second run of a sweep". One more launch with `python -X importtime`
    says how much of it is imports."""
    import mlflow

    from lora_efficiency.children import train_command
    from lora_efficiency.config import TrainConfig, build_config, read_defaults

    uri = f"sqlite:///{work}/startup.db"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("bench-startup", artifact_location=str(work / "startup-artifacts"))
    overrides = dict(
        model=model_path(model),
        quantization=mode,
        max_steps=1,
        batch_size=batch_size,
        seq_len=seq_len,
        eval_samples=1,
        generate_samples=0,
        max_new_tokens=1,
        device=device,
    )
    command = train_command(build_config(TrainConfig, {**read_defaults("train"), **overrides}), data_path)
    launch = _Launcher(client, experiment_id, uri, work)
    launched = []
    for i in range(launches):
        launched.append(launch(command, i))
        log(f"startup launch {i + 1}: {launched[-1]:.1f} s from launch to the first step")
    if launches < 2:
        return {"launches_s": launched, "second_run_s": None}
    first = launch([command[0], "-X", "importtime", *command[1:]], launches)
    imports = import_times(launch.stderr(launches))
    log(f"startup with -X importtime: {first:.1f} s, of which imports {imports['total_s']:.1f} s")
    return {"launches_s": launched, "second_run_s": statistics.median(launched[1:]), "imports": imports}


class _Launcher:
    """Runs one launch of the train command in an MLflow run made for it (as a sweep makes one per child) and
    returns the run's time/startup_s; the launch's stderr stays in work/startup-N.stderr."""

    def __init__(self, client, experiment_id: str, uri: str, work: Path):
        self.client, self.experiment_id, self.uri, self.work = client, experiment_id, uri, work

    def stderr(self, i: int) -> str:
        return (self.work / f"startup-{i}.stderr").read_text(errors="replace")

    def __call__(self, command: list[str], i: int) -> float:
        run_id = self.client.create_run(self.experiment_id, run_name=f"startup-{i}").info.run_id
        env = worker_env(
            MLFLOW_TRACKING_URI=self.uri,
            MLFLOW_RUN_ID=run_id,
            MLFLOW_EXPERIMENT_ID=self.experiment_id,
            MLFLOW_LOGGING_LEVEL="WARNING",
        )
        with open(self.work / f"startup-{i}.stderr", "w") as err:
            proc = subprocess.run(
                command, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env, preexec_fn=die_with_parent
            )
        startup = self.client.get_run(run_id).data.metrics.get("time/startup_s")
        if proc.returncode != 0 or startup is None:
            tail = "\n".join(self.stderr(i).splitlines()[-25:])
            raise RuntimeError(f"startup launch {i} failed (exit status {proc.returncode}):\n{tail}")
        return startup
