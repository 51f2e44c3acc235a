"""MLflow plumbing: open (or resume) a run, log without clashing with what `mlflow run` already logged."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow

from lora_efficiency.errors import UserError

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "lora-efficiency"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parents[1],
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MlflowTracker:
    """The Tracker the trainer logs to. Per-step metrics go asynchronously: a synchronous log_metrics call to a
    server costs ~55 ms (../shared/ENVIRONMENT.md), longer than a GPU step; the queue is flushed at the end."""

    def __init__(self, run_id: str):
        self.run_id = run_id  # the run this tracker logs to
        self.client = mlflow.MlflowClient()

    def log_params(self, params: dict) -> None:
        # `mlflow run` already logged every MLproject param as the text given ("2e-4"); logging the same key
        # again with another spelling ("0.0002") is refused by MLflow, and both mean the same value.
        existing = self.client.get_run(self.run_id).data.params
        fresh = {k: str(v) for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params(fresh)

    def set_tags(self, tags: dict) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics(metrics, step=step, synchronous=step is None)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        mlflow.log_artifacts(local_dir, artifact_path)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        mlflow.log_table(data=data, artifact_file=artifact_file)


def check_tracking_store() -> None:
    """Fail before any training if the tracking store cannot be reached."""
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as exc:
        uri = mlflow.get_tracking_uri()
        raise UserError(f"MLFLOW_TRACKING_URI={uri!r} cannot be reached: {str(exc).splitlines()[0][:200]}") from None


@contextlib.contextmanager
def start_run(*, run_name: str, entry_point: str, system_metrics: bool = True) -> Iterator[MlflowTracker]:
    """Resume the run `mlflow run` opened (MLFLOW_RUN_ID), or start one; FAILED on exception, never RUNNING."""
    check_tracking_store()
    if "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
    with mlflow.start_run(run_name=run_name, log_system_metrics=system_metrics) as run:
        mlflow.set_tags({"entry_point": entry_point, "git_commit": git_commit()})
        try:
            yield MlflowTracker(run.info.run_id)
        except BaseException as exc:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            with contextlib.suppress(Exception):
                mlflow.flush_async_logging()
            raise
        mlflow.flush_async_logging()
