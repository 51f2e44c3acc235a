"""MLflow plumbing: open (or resume) a run, log without clashing with what `mlflow run` already logged."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import filelock
import mlflow
import psutil
import requests
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import LoggedModelStatus
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from lora_efficiency.cli import no_interrupts, quiet_log_records
from lora_efficiency.errors import TrackingError, UserError, cause_line
from lora_efficiency.redaction import mask_stored, redact

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
# a unique-key violation as SQLite, PostgreSQL and MySQL word it (through MLflow's store or its REST server)
_UNIQUE_VIOLATION = re.compile(r"IntegrityError|UniqueViolation|UNIQUE constraint|duplicate key|Duplicate entry")
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


_TEXT_SUFFIXES = (".json", ".md", ".txt", ".csv", ".yaml", ".yml", ".jinja")


@contextlib.contextmanager
def redacted_copy(local_dir: str) -> Iterator[str]:
    """`local_dir` itself, or a temporary copy of it (same folder name: it may be shown) whose text files have
    their shaped secrets masked (mask_stored: a URI's password, a token), removed on exit."""
    files = [f for f in Path(local_dir).rglob("*") if f.is_file() and f.suffix in _TEXT_SUFFIXES]
    dirty = [f for f in files if mask_stored(text := f.read_text(errors="replace")) != text]
    if not dirty:
        yield local_dir
        return
    with tempfile.TemporaryDirectory(prefix="redacted-") as tmp:
        copy = Path(tmp) / Path(local_dir).name
        shutil.copytree(local_dir, copy)
        for f in dirty:
            target = copy / f.relative_to(local_dir)
            target.write_text(mask_stored(target.read_text(errors="replace")))
        yield str(copy)


class MlflowTracker:
    """The Tracker the trainer logs to. Per-step metrics go asynchronously: a synchronous log_metrics call to a
    server costs ~55 ms (../shared/ENVIRONMENT.md), longer than a GPU step. MLflow retries a failed request
    (7 times, backoff 2 s doubling: ~4 min) and reports a batch that still failed only on its own handle, not
    at flush: `flush()` waits on every handle, logs a failed batch again synchronously with its original
    timestamp, and raises if that fails too, so a run never ends FINISHED with a gap in its curves."""

    def __init__(self, run_id: str):
        self.run_id = run_id  # the run this tracker logs to
        self.client = mlflow.MlflowClient()
        self.pending: list[tuple[object, dict[str, float], int, int]] = []  # (handle, metrics, step, timestamp)

    def log_params(self, params: dict) -> None:
        # `mlflow run` already logged every MLproject param as the text given ("2e-4"); logging the same key
        # again with another spelling ("0.0002") is refused by MLflow, and both mean the same value.
        existing = self.client.get_run(self.run_id).data.params
        fresh = {k: mask_stored(str(v)) for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params(fresh)

    def set_tags(self, tags: dict) -> None:
        mlflow.set_tags({k: mask_stored(str(v)) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is None:
            mlflow.log_metrics(metrics, synchronous=True)
            return
        timestamp = int(time.time() * 1000)
        with no_interrupts():  # a SIGTERM is raised at the next step, not inside MLflow's queue
            handle = mlflow.log_metrics(metrics, step=step, synchronous=False, run_id=self.run_id, timestamp=timestamp)
            self.pending.append((handle, metrics, step, timestamp))

    def flush(self) -> None:
        """Every step's metrics are in the store when this returns; else TrackingError names what is missing."""
        lost = []
        for handle, metrics, step, timestamp in self.pending:
            try:
                handle.wait()
            except Exception:
                try:  # MLflow's own retries apply again
                    mlflow.log_metrics(metrics, step=step, synchronous=True, run_id=self.run_id, timestamp=timestamp)
                except Exception as exc:
                    lost.append((step, exc))
        self.pending.clear()
        if lost:
            steps = [s for s, _ in lost]
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()!r}: the metrics of {len(steps)} step(s) "
                f"({steps[0]}..{steps[-1]}) could not be logged after MLflow's retries "
                f"({cause_line(lost[-1][1])[:200]}): the run is incomplete"
            )

    def log_text(self, text: str, artifact_file: str) -> None:
        with _artifact_storage(artifact_file):
            mlflow.log_text(mask_stored(text), artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        with _artifact_storage(artifact_path), redacted_copy(local_dir) as clean:
            mlflow.log_artifacts(clean, artifact_path)

    def log_files(self, root: Path, files: list[Path], artifact_path: str = "") -> None:
        """Exactly `files` (each under `root`, at its path relative to it), never whatever else `root` holds."""
        with tempfile.TemporaryDirectory(prefix="artifacts-") as tmp:
            for f in files:
                target = Path(tmp) / Path(f).resolve().relative_to(Path(root).resolve())
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
            self.log_artifacts(tmp, artifact_path)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        data = {k: [mask_stored(v) if isinstance(v, str) else v for v in col] for k, col in data.items()}
        with _artifact_storage(artifact_file):
            mlflow.log_table(data=data, artifact_file=artifact_file)

    def log_data_inputs(self, manifest: dict, prepared_path: str, splits: tuple[str, ...] = ("train", "eval")) -> None:
        """The prepared folder's splits as the run's dataset inputs (the UI's Datasets column)."""
        datasets = data_inputs(manifest, prepared_path, splits)
        # MLflow's SQL store looks the dataset up, then inserts it (mlflow 3.17.2, sqlalchemy_store
        # `_log_inputs_impl`): two runs of one experiment logging the same new dataset at once can both miss
        # it, and the second insert fails on UNIQUE(experiment_id, name, digest). Seen in 1 of 8 concurrent
        # trainings (tests/reliability/test_load.py, CI 2026-12-02). The failed transaction is rolled back, so
        # trying again finds the row the other run wrote.
        for attempt in range(3):
            try:
                mlflow.log_inputs(
                    datasets=[d for d, _ in datasets],
                    contexts=list(splits),
                    tags_list=[{"rows": str(n)} for _, n in datasets],
                )
                return
            except mlflow.exceptions.MlflowException as exc:
                if attempt == 2 or not _UNIQUE_VIOLATION.search(str(exc)):
                    raise
                time.sleep(0.1 * (attempt + 1))


def data_inputs(manifest: dict, prepared_path: str, splits: tuple[str, ...] = ("train", "eval")) -> list:
    """(mlflow.data dataset, rows) for each split of a prepared folder: named `<set>-<split>`, digest = the
    content fingerprint of the tokenized splits, source = where the records came from (the hub set, the file,
    or, for a set generated in code, the origin and the prepared folder). A MetaDataset: the rows stay in the
    prepared folder, not copied into the tracking store."""
    origin = mask_stored(manifest.get("origin", ""))  # a path may hold a token, like any param
    if origin.startswith("hub:"):  # the hub's default revision: the origin records none
        source = HuggingFaceDatasetSource(path=origin.removeprefix("hub:"))
    elif origin.startswith("file:"):
        source = resolve_dataset_source(origin.removeprefix("file:"))
    else:
        source = CodeDatasetSource({"origin": origin, "prepared_path": mask_stored(str(prepared_path))})
    return [
        (
            MetaDataset(source, name=mask_stored(f"{manifest['dataset']}-{split}"), digest=manifest["fingerprint"]),
            manifest.get(split, {}).get("count", 0),
        )
        for split in splits
    ]


@contextlib.contextmanager
def _artifact_storage(what: str) -> Iterator[None]:
    """A failing artifact store (read-only, full, gone) becomes one line that names it, not a traceback."""
    try:
        yield
    except (OSError, mlflow.exceptions.MlflowException) as exc:
        raise TrackingError(
            f"artifact storage {mlflow.get_artifact_uri()!r} failed writing {what}: {cause_line(exc)[:300]}"
        ) from None


def check_artifact_storage() -> None:
    """A local artifact root must take a file: fail before training, not after it."""
    uri = mlflow.get_artifact_uri()
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return  # proxied (mlflow-artifacts:) or remote: the server checks; failures surface as TrackingError
    root = Path(urllib.parse.unquote(parsed.path))
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as exc:
        raise TrackingError(f"artifact storage {uri!r} is not writable: {exc}") from None


def download_checkpoint(run_id: str) -> Path:
    """The latest `checkpoints/step-NNNNNN` artifact of run `run_id`, downloaded to a local folder."""
    client = mlflow.MlflowClient()
    try:
        client.get_run(run_id)
    except Exception:
        raise UserError(
            f"resume_from={run_id!r} does not exist in the tracking store {mlflow.get_tracking_uri()}"
        ) from None
    steps = sorted(f.path for f in client.list_artifacts(run_id, "checkpoints") if f.is_dir)
    if not steps:
        raise UserError(f"resume_from={run_id!r} has no checkpoint: train with checkpoint_every > 0 to make them")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=steps[-1]))


def owner_tags() -> dict[str, str]:
    """Who writes a run: this host, this process and its start time (a pid alone is reused after the process
    dies). A RUNNING run whose owner is gone is FAILED by the next command on its store (fail_orphaned_runs)."""
    return {
        "owner_host": socket.gethostname(),
        "owner_pid": str(os.getpid()),
        "owner_started": f"{psutil.Process().create_time():.2f}",
    }


def owner_gone(tags: dict[str, str]) -> str:
    """Why a RUNNING run's owner (owner_tags) is gone, or "" when it lives or cannot be judged (another host, no
    owner tags): its pid is dead, or now belongs to a process started at another time."""
    if tags.get("owner_host") != socket.gethostname() or not tags.get("owner_pid", "").isdigit():
        return ""  # another machine's run: not ours to judge
    pid = int(tags["owner_pid"])
    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return f"its process {pid} on {tags['owner_host']} is gone"
    except psutil.Error:  # AccessDenied: a process of another user lives there
        return ""
    if "owner_started" in tags and abs(started - float(tags["owner_started"])) > 1.0:
        return f"its process {pid} on {tags['owner_host']} is gone (the pid now belongs to another process)"
    return ""


def fail_orphaned_runs(client, experiment_id: str | None = None, *, by: str = "") -> int:
    """Mark FAILED, with an `error` tag saying why, every RUNNING run whose owner is gone (a `kill -9`, a machine
    that lost power), in `experiment_id` or, None, in every experiment of the store: no run stays RUNNING forever.
    A MLflow model such a run was logging (a LoggedModel still PENDING) is marked FAILED too. Returns how many runs."""
    ids = [experiment_id] if experiment_id is not None else _experiment_ids(client)
    failed = 0
    for chunk in (ids[i : i + 100] for i in range(0, len(ids), 100)):
        for run in client.search_runs(chunk, filter_string="attributes.status = 'RUNNING'", max_results=5000):
            if reason := owner_gone(run.data.tags):
                client.set_tag(run.info.run_id, "error", f"orphaned: {reason}; marked FAILED{by}")
                client.set_tag(run.info.run_id, "failed_reason", "owner_gone")
                client.set_terminated(run.info.run_id, "FAILED")
                failed += 1
                with contextlib.suppress(Exception):  # a server without logged models (MLflow 2) has none to fail
                    models = client.search_logged_models(
                        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
                    )
                    for model in models:
                        if str(model.status) == str(LoggedModelStatus.PENDING):
                            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    return failed


def _experiment_ids(client) -> list[str]:
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        if not (token := page.token):
            return ids


@contextlib.contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """Held while this process opens an SQLite store: MLflow creates a new store's tables when it finds none
    (SqlAlchemyStore.__init__, mlflow 3.17.2) with no lock, so two commands creating one store at once both create
    them and one fails ("table experiments already exists", "duplicate column": 4 of 4 tries). A file lock beside
    the database serializes that; the second finds the tables made. Where no lock file can be made (a read-only
    folder: nothing can be created there either), the store is opened without one."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + ":memory:"):
        yield
        return
    lock = filelock.FileLock(f"{urllib.parse.unquote(uri[len(prefix) :].split('?')[0])}.lock", timeout=120)
    try:
        lock.acquire()
    except (OSError, filelock.Timeout):
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _probe_health(uri: str) -> None:
    """GET <server>/health once, with the credentials MLflow's client would send: a `user:password@` in the URI
    (requests takes it from there; urllib took it for the host and failed) or MLFLOW_TRACKING_USERNAME/PASSWORD,
    MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH (host creds)."""
    http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=5).raise_for_status()


def check_tracking_store() -> None:
    """Fail before any training if the tracking store cannot be reached (a server gets a quick probe first: MLflow's
    own client retries a refused connection for ~4 min before it gives up), then mark FAILED every run of the store
    left RUNNING by a process that is gone (fail_orphaned_runs). Every command that uses the store calls this first."""
    quiet_log_records()  # MLflow's logger exists now: its records are masked, its tracebacks go to the log file
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        for attempt in range(3):  # ~3 s: a server that is restarting gets a moment
            try:
                _probe_health(uri)
                break
            except (requests.exceptions.RequestException, mlflow.exceptions.MlflowException) as exc:
                if attempt == 2:
                    reason = redact(cause_line(exc))[:200]
                    raise TrackingError(f"MLFLOW_TRACKING_URI={redact(uri)!r} cannot be reached: {reason}") from None
                time.sleep(1.5)
    try:
        with _store_creation_lock(uri):
            client = mlflow.MlflowClient()
            client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={redact(uri)!r} cannot be reached: {redact(cause_line(exc))[:200]}"
        ) from None
    # every command reaches the store here first: whatever it does next (an early exit included), a run left
    # RUNNING by a killed process is FAILED by then
    with contextlib.suppress(Exception):  # cleaning up after others never stops this command
        fail_orphaned_runs(client, by=f" by {Path(sys.argv[0]).stem or 'python'} (process {os.getpid()})")


@contextlib.contextmanager
def start_run(
    *, run_name: str, entry_point: str, system_metrics: bool = True, experiment: str = "", description: str = ""
) -> Iterator[MlflowTracker]:
    """Resume the run `mlflow run` opened (MLFLOW_RUN_ID), or start one in `experiment` (empty:
    $MLFLOW_EXPERIMENT_NAME, else lora-efficiency); FAILED on exception, never RUNNING. `description` is the
    run's description in the UI (the mlflow.note.content tag: set here, as start_run's own argument is ignored
    for the run `mlflow run` created)."""
    check_tracking_store()
    if "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(experiment or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
    run = mlflow.start_run(run_name=mask_stored(run_name), log_system_metrics=system_metrics)
    try:
        tags = {"entry_point": entry_point, "git_commit": git_commit(), **owner_tags()}
        if description:
            tags["mlflow.note.content"] = redact(description)
        mlflow.set_tags(tags)
        check_artifact_storage()
        tracker = MlflowTracker(run.info.run_id)
        yield tracker
        tracker.flush()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            mlflow.set_tag("error", redact(f"{type(exc).__name__}: {exc}")[:5000])
        with contextlib.suppress(Exception):
            mlflow.flush_async_logging()
        with contextlib.suppress(Exception):  # the store may be what failed: run_cli says so and exits non-zero
            mlflow.end_run("FAILED")
        with contextlib.suppress(Exception):  # end_run fails when an interrupt broke MLflow's async logging state
            client = mlflow.MlflowClient()
            if client.get_run(run.info.run_id).info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "FAILED")
        if isinstance(exc, (mlflow.exceptions.MlflowException, requests.exceptions.RequestException)):
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()!r} failed during run {run.info.run_id}: "
                f"{redact(cause_line(exc))[:300]}"
            ) from None
        raise
    try:
        mlflow.end_run()
    except Exception as exc:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()!r}: run {run.info.run_id} could not be marked "
            f"FINISHED: {cause_line(exc)[:200]}"
        ) from None
