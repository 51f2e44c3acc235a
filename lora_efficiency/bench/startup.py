"""The second run of a sweep: how long a child, launched as a sweep launches it, takes from its start to its first
training step. Measured both ways a local sweep can launch one: forked from the warm server (children.WarmChildren,
the default) and as a fresh `python -m entrypoints.train` (`warm_children=false`, and every Ray task), with how much
of the fresh one is imports."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlflow

from lora_efficiency.bench.figures import import_times
from lora_efficiency.bench.recipe import model_path
from lora_efficiency.bench.workers import worker_env
from lora_efficiency.children import WarmChildren, _run_child
from lora_efficiency.config import TrainConfig, build_config, read_defaults, settings_text


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
    """Launch a one-step training exactly as a sweep launches a child (its arguments, an MLflow run made for it,
    the prepared data folder) `launches` times each way, and read each launch's `time/startup_s` back from its
    run: the trainer's seconds from the process's start (a fork's start, for a warm child) to the start of its
    first step. The first launch may meet cold caches; the later ones are the "second run of a sweep". The warm
    server's own start (its imports, once a sweep) is timed apart. One more fresh launch with `python -X
    importtime` says how much of a fresh one is imports."""
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
        data=str(data_path),
    )
    settings = work / "startup-settings.yaml"  # launched as a sweep child is: one settings file
    settings.write_text(settings_text(build_config(TrainConfig, {**read_defaults("train"), **overrides})))
    args = ["--config", str(settings)]
    launch = _Launcher(client, experiment_id, uri, work)
    fresh = [launch(_run_child, args, f"fresh-{i}") for i in range(launches)]
    log(f"startup, fresh processes: {', '.join(f'{t:.1f}' for t in fresh)} s from launch to the first step")
    with WarmChildren() as warm_children:
        t0 = time.perf_counter()
        forked = warm_children.start(launch.env())  # what a sweep's first child waits for, once a sweep
        server_s = time.perf_counter() - t0
        warm = [launch(warm_children, args, f"warm-{i}") for i in range(launches)]
    log(f"startup, forks of the warm server: {', '.join(f'{t:.1f}' for t in warm)} s (server start {server_s:.1f} s)")
    result = {
        "launches_s": warm,
        "second_run_s": statistics.median(warm[1:]) if launches > 1 else None,
        "server_start_s": server_s,
        "forked": forked,  # False: the server found forking unsafe and the "warm" launches were fresh processes
        "fresh_launches_s": fresh,
        "fresh_second_run_s": statistics.median(fresh[1:]) if launches > 1 else None,
    }
    if launches > 1:
        first = launch(_python, ["-X", "importtime", "-m", "entrypoints.train", *args], "importtime")
        result["imports"] = import_times(launch.stderr("importtime"))
        log(f"startup with -X importtime: {first:.1f} s, of which imports {result['imports']['total_s']:.1f} s")
    return result


class _Launcher:
    """Runs one launch in an MLflow run made for it (as a sweep makes one per child) and returns the run's
    time/startup_s; the launch's stderr stays in work/startup-NAME.stderr."""

    def __init__(self, client, experiment_id: str, uri: str, work: Path):
        self.client, self.experiment_id, self.uri, self.work = client, experiment_id, uri, work

    def env(self, **run: str) -> dict[str, str]:
        """A launch's environment: the store, quiet MLflow logging, and the `run` ids of the launch."""
        return worker_env(MLFLOW_TRACKING_URI=self.uri, MLFLOW_LOGGING_LEVEL="WARNING", **run)

    def stderr(self, name: str) -> str:
        return (self.work / f"startup-{name}.stderr").read_text(errors="replace")

    def __call__(self, launcher, args: list[str], name: str) -> float:
        """`launcher(args, env) -> (exit status, stderr)`, as children.run_job calls its launchers."""
        run_id = self.client.create_run(self.experiment_id, run_name=f"startup-{name}").info.run_id
        env = self.env(MLFLOW_RUN_ID=run_id, MLFLOW_EXPERIMENT_ID=self.experiment_id)
        returncode, stderr = launcher(args, env)
        (self.work / f"startup-{name}.stderr").write_text(stderr)
        startup = self.client.get_run(run_id).data.metrics.get("time/startup_s")
        if returncode != 0 or startup is None:
            tail = "\n".join(stderr.splitlines()[-25:])
            raise RuntimeError(f"startup launch {name} failed (exit status {returncode}):\n{tail}")
        return startup


def _python(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`python ARGS` (python's own options first) as a fresh process: its exit status and stderr."""
    command = [sys.executable, *args]
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    return proc.returncode, proc.stderr
