"""A sweep's children as Ray tasks: the same child runs as the local backend, placed and run concurrently by Ray.

mlflow run . -e sweep --env-manager local -P config=configs/sweeps/rank.yaml -P backend=ray            # local Ray
mlflow run . -e sweep --env-manager local -P config=... -P backend=ray -P ray_address=auto             # a cluster

Each task is `children.run_job`: it creates the child's MLflow run on the node that trains it, then runs
`python -m entrypoints.train` there as a process of its own, exactly as the local backend does, so a child that
crashes (even a segfault or an OOM kill) fails alone. Ray only schedules: a task asks for `cpus_per_trial` CPUs
and `gpus_per_trial` GPUs, and Ray starts as many as the cluster's free resources (and `max_concurrent`) allow.

What travels to a cluster (`ray_address` set): this project folder as the job's working_dir (Ray uploads it,
without .venv, mlruns, .git...), the tracking URI (a server every node reaches: a local SQLite file is refused
before anything runs) and the data *reference* (the bundled set, a hub set name or a prepare run id, prepared on
each node and identical there by its content fingerprint); the Python environment must already be on the nodes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator

from lora_efficiency.children import Job, Outcome, run_job
from lora_efficiency.errors import UserError
from lora_efficiency.subprocesses import ROOT

# Left out of the working_dir Ray uploads to a cluster (its limit is 500 MiB; .venv alone is ~5 GB).
UPLOAD_EXCLUDES = [".venv", ".git", "mlruns", "mlartifacts", "mlflow.db", "reports", ".pytest_cache", ".hypothesis"]
# Every child prints ~20 similar step lines: Ray's default log deduplication would fold other children's lines
# into "[repeated 2x across cluster]". RAY_DEDUP_LOGS is read when ray is first imported, so it is set here.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
SHARED_STORE_SCHEMES = ("http://", "https://", "databricks", "postgresql", "mysql", "mssql")


def check_backend(backend: str, ray_address: str) -> None:
    """What `sweep` and `main` refuse for a Ray cluster, before anything is prepared (nothing for backend local)."""
    if backend == "ray":
        import mlflow  # lazy: a Ray worker unpickling run_job imports this module without needing this check

        check_cluster_settings(address=ray_address, tracking_uri=mlflow.get_tracking_uri())


def check_cluster_settings(*, address: str, tracking_uri: str) -> None:
    """Refuse, before any run exists, what cannot work on a cluster: children on other nodes would each write
    to their own SQLite file (or none at all)."""
    if address and not tracking_uri.startswith(SHARED_STORE_SCHEMES):
        raise UserError(
            f"ray_address={address!r} needs a tracking store every node reaches, and MLFLOW_TRACKING_URI="
            f"{tracking_uri!r} is local to this machine: set it to an MLflow server (http://host:5000, backed by "
            "PostgreSQL and an object store) or a database URI, or leave ray_address empty for a local Ray instance"
        )
    try:
        import ray  # noqa: F401 - lazy: optional (backend=ray only), absent from a plain install
    except ImportError:
        raise UserError("backend='ray' needs the ray package: pip install ray==2.60.0 (make setup)") from None


def _connect(address: str):
    import ray  # lazy: optional (check_cluster_settings)

    if ray.is_initialized():
        return ray, False
    if address:
        ray.init(
            address=address,
            runtime_env={"working_dir": str(ROOT), "excludes": UPLOAD_EXCLUDES},
            log_to_driver=True,
        )
    else:
        # "local": a new instance even if `ray start` runs on this machine (plain ray.init() would join that).
        # The tasks pass a few KB of results: a 256 MB object store instead of 30 % of the machine's memory.
        # The node announces itself on loopback and has no dashboard; Ray 2.60's GCS server and raylet still
        # listen on every interface (measured; no setting binds them), behind the token Ray makes per machine.
        ray.init(
            address="local",
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            log_to_driver=True,
            _node_ip_address="127.0.0.1",
        )
    return ray, True


def _run_on_node(job: Job) -> Outcome:
    """children.run_job on the node Ray placed the task on, the child's run tagged with that node: the host name
    (owner_host) does not tell apart two nodes on one machine or two pods of one name."""
    import ray  # lazy: optional (check_cluster_settings)

    node = {"ray_node_id": ray.get_runtime_context().get_node_id(), "ray_node_ip": ray.util.get_node_ip_address()}
    return run_job(dataclasses.replace(job, tags={**job.tags, **node}))


def _gpus(gpus_per_trial: str, num_processes: int, cluster_gpus: float) -> float:
    if gpus_per_trial == "auto":  # one per training process when the cluster has GPUs, else none
        return float(num_processes) if cluster_gpus > 0 else 0.0
    return float(gpus_per_trial)


def _lost_task(job: Job, exc: Exception, seconds: float) -> Outcome:
    """The outcome of a task whose worker died: its run, if the task got as far as creating it, is found by its
    sweep_key tag (still RUNNING) so the sweep marks it FAILED."""
    from mlflow import MlflowClient  # lazy: as check_backend's

    client = MlflowClient(job.env.get("MLFLOW_TRACKING_URI"))
    runs = client.search_runs(
        [job.experiment_id],
        filter_string=f"tags.sweep_key = '{job.key}' and attributes.status = 'RUNNING'",
    )
    run_id = runs[0].info.run_id if runs else ""
    return Outcome(run_id, 1, f"error: the Ray task died: {str(exc).splitlines()[0][:300]}", seconds)


def run_jobs(
    jobs: list[Job],
    *,
    address: str = "",
    max_concurrent: int = 0,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: str = "auto",
    say: Callable[[str], None] = print,
) -> Iterator[tuple[Job, Outcome]]:
    """Submit every job as a Ray task and yield (job, outcome) as each one ends, in the order they end.

    A task whose worker died (node lost, worker killed) yields an Outcome with the Ray error; its run, if the task
    got as far as creating it, is found by its sweep_key tag so the sweep marks it FAILED.
    """
    if not jobs:
        return
    ray, started = _connect(address)
    cluster = ray.cluster_resources()
    say(
        f"[ray] {'local instance' if started and not address else address}: {cluster.get('CPU', 0):g} CPUs, "
        f"{cluster.get('GPU', 0):g} GPUs; {len(jobs)} task(s), {cpus_per_trial:g} CPU(s) each"
        + (f", at most {max_concurrent} at once" if max_concurrent else "")
    )
    task = ray.remote(_run_on_node)
    queue, pending = list(jobs), {}
    try:
        while queue or pending:
            while queue and (not max_concurrent or len(pending) < max_concurrent):
                job = queue.pop(0)
                options = {
                    "num_cpus": cpus_per_trial * job.num_processes,
                    "num_gpus": _gpus(gpus_per_trial, job.num_processes, cluster.get("GPU", 0)),
                    "max_retries": 0,  # a failed child is recorded FAILED, not run twice
                    "name": f"train {job.name}",
                }
                pending[task.options(**options).remote(job)] = (job, time.perf_counter())
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            job, t0 = pending.pop(ref)
            try:
                yield job, ray.get(ref)
            except ray.exceptions.RayError as exc:
                yield job, _lost_task(job, exc, time.perf_counter() - t0)
    finally:
        for ref in pending:  # interrupted: nothing keeps running on the cluster
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
