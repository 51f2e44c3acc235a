"""The runs a report covers, read back through the MLflow runs API into plain records: RunData for one run, Scope
for the set (the study or sweep run, its FINISHED and failed training runs, the baselines), the loss history of
each run, and the memory planner's prediction beside each run's measured peak.

Only a client's search_runs, get_experiment_by_name, search_experiments, get_metric_history and download_artifacts
are called: mlflow itself is not imported here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from lora_efficiency.config import parse_bool
from lora_efficiency.configuration import REPORT_SETTINGS
from lora_efficiency.design import contrasts_from_json
from lora_efficiency.errors import UserError, shown
from lora_efficiency.models import resolve_model
from lora_efficiency.names import preferred_name
from lora_efficiency.planner import estimate
from lora_efficiency.report.metrics import PEAK_MB, PREDICTED_MB


@dataclass
class RunData:
    """One MLflow run, as read from the runs API."""

    run_id: str
    name: str
    status: str
    start_ms: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    # other target_modules names that adapt the same modules on this model (one_per_resolved_modules): the
    # configuration is labelled "all_linear (= attention_mlp)"
    also_named: tuple[str, ...] = ()
    end_ms: int = 0  # the run's end time; 0 while it runs (or where not read)

    @property
    def config_hash(self) -> str:
        return self.tags.get("config_hash") or "|".join(self.params.get(p, "") for p in REPORT_SETTINGS)

    @property
    def seed(self) -> int:
        return int(self.params.get("seed") or self.tags.get("seed") or 0)

    @property
    def settings(self) -> dict[str, str]:
        """The params that make a configuration (configuration.REPORT_SETTINGS), "" where the run has none. A run
        whose learning rate was tuned (tag lr_tuned=true) has `lr` = "tuned over <grid>": configurations that differ
        in one axis are compared each at its own best rate (the chosen rates are in the report's Learning rates
        section), which is the point of tuning."""
        settings = {p: self.params.get(p, "") for p in REPORT_SETTINGS}
        # logged only when they matter: a run without them trained in one process (before sharding existed: unsharded)
        settings["world_size"] = settings["world_size"] or "1"
        settings["sharding"] = settings["sharding"] or "none"
        if self.tags.get("lr_tuned") == "true":
            settings["lr"] = f"tuned over {self.tags.get('lr_chosen_from', '?')}"
        if self.also_named:
            settings["target_modules"] += f" (= {', '.join(self.also_named)})"
        return settings

    @property
    def base_gguf_type(self) -> str:
        """The GGUF type the base's 16-bit weights were dequantized from ("Q4_1"); "" when not from a GGUF."""
        return self.tags.get("base_gguf_type", "")

    @property
    def base_checkpoint_dtype(self) -> str:
        """The dtype of the base's checkpoint, as the run recorded it; "" when not recorded."""
        return self.tags.get("base_checkpoint_dtype", "")

    @property
    def storage(self) -> str:
        """The base model's storage (quantization): the tag a baseline carries, else the param."""
        return self.tags.get("quantization", self.params.get("quantization", ""))


def run_data(run) -> RunData:
    """One mlflow.entities.Run as a RunData."""
    return RunData(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        status=run.info.status,
        start_ms=run.info.start_time or 0,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
        end_ms=run.info.end_time or 0,
    )


@dataclass
class Scope:
    """What one report covers: FINISHED training runs, the failed ones, the baselines, and how they were found."""

    experiment: str
    root: RunData | None  # the study or sweep run whose runs are reported; None: every sweep run of the experiment
    runs: list[RunData]
    failed: list[RunData]
    baselines: list[RunData]
    sweeps: list[RunData]  # sweep parent runs in scope, with their children_* counts
    notes: list[str] = field(default_factory=list)
    pilots: list[RunData] = field(default_factory=list)  # every learning-rate pilot of the experiment: report/lr.py


def fetch_scope(client, *, experiment: str, sweep_run_id: str = "") -> Scope:
    """The runs of one report, from `client.search_runs` alone.

    By default the latest study run (entry point main) and its descendants; with no study run, every sweep child
    of the experiment; with `sweep_run_id`, that sweep or study run and its descendants. A sweep skips a
    configuration that another sweep already FINISHED (same sweep_key), so FINISHED sweep children elsewhere in
    the experiment join when they share every setting that the scope's own runs hold fixed, other than the
    sweeps' axes: the modules sweep gets back its rank 16 / attention / nf4 runs from the rank sweep, a resumed
    study the runs of its first try.

    Args:
        client: an MlflowClient (or anything with its search_runs, get_experiment_by_name, search_experiments).
        experiment: the experiment's name.
        sweep_run_id: a sweep or study run of that experiment; "" for the latest study run.

    Returns:
        The scope; its notes say what was left out or joined, and why.

    Raises:
        UserError: no such experiment or run, or no FINISHED training run to report.
    """
    every_run = _all_runs(client, _experiment_id(client, experiment))
    everything = [r for r in every_run if r.tags.get("sweep_role") != "pilot"]  # pilots are no configuration
    root = _root(everything, experiment, sweep_run_id)
    tree = everything if root is None else _descendants(everything, root)
    training = [r for r in tree if "sweep_key" in r.tags]
    finished = [r for r in training if r.status == "FINISHED"]
    notes: list[str] = []
    if root is not None:
        joined = _joined_from_other_sweeps(everything, tree, training, finished, root)
        if joined:
            notes.append(
                f"{len(joined)} runs of other sweeps joined: the same settings FINISHED elsewhere in the experiment "
                "are skipped by a sweep, so they are counted here"
            )
        finished += joined
    finished, repeats = _latest_per_seed(finished)
    if repeats:
        notes.append(f"{repeats} older runs of a configuration and seed that ran again were left out")
    finished, merged = one_per_resolved_modules(finished, _declared_aliases(tree))
    notes += merged
    failed, unfinished_notes = _failed_not_retried(training, finished)
    if not finished:
        raise _nothing_to_report(experiment, root, failed)
    baselines, baseline_notes = _baselines(everything, finished)
    sweeps = [r for r in tree if r.tags.get("entry_point") == "sweep"]
    pilots = [r for r in every_run if r.tags.get("sweep_role") == "pilot"]
    return Scope(
        experiment, root, finished, failed, baselines, sweeps, notes + unfinished_notes + baseline_notes, pilots
    )


def declared_contrasts(scope: Scope) -> list:  # list[design.Contrast]
    """The contrasts the scope's study declared before its runs: its study run's `study_contrasts` tag (what the
    profile said when the study started); none for a sweep or an older study."""
    return contrasts_from_json(scope.root.tags.get("study_contrasts", "")) if scope.root is not None else []


def _experiment_id(client, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        known = ", ".join(shown(n, 60) for n in names[:20]) + (f" and {len(names) - 20} more" if names[20:] else "")
        raise UserError(f"experiment={shown(experiment)} does not exist: known experiments are {known or 'none'}")
    return exp.experiment_id


def _all_runs(client, experiment_id: str) -> list[RunData]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs += [run_data(r) for r in page]
        token = page.token
        if not token:
            return runs


def _root(everything: list[RunData], experiment: str, sweep_run_id: str) -> RunData | None:
    """The run whose descendants are reported: `sweep_run_id`, else the latest study run, else None."""
    if sweep_run_id:
        root = next((r for r in everything if r.run_id == sweep_run_id), None)
        if root is None:
            raise UserError(f"sweep_run_id={sweep_run_id!r} is not a run of experiment {experiment!r}")
        return root
    studies = [r for r in everything if r.tags.get("entry_point") == "main"]
    return max(studies, key=lambda r: r.start_ms) if studies else None


def _descendants(everything: list[RunData], root: RunData) -> list[RunData]:
    children: dict[str, list[RunData]] = defaultdict(list)
    for r in everything:
        if parent := r.tags.get("mlflow.parentRunId"):
            children[parent].append(r)
    tree, todo = [], list(children[root.run_id])
    while todo:
        run = todo.pop()
        tree.append(run)
        todo += children[run.run_id]
    return tree


def _joined_from_other_sweeps(
    everything: list[RunData], tree: list[RunData], training: list[RunData], finished: list[RunData], root: RunData
) -> list[RunData]:
    """FINISHED sweep children outside the tree that share every setting the tree's runs hold fixed."""
    tree_ids = {r.run_id for r in tree}
    # the sweeps' axes, from the children's labels ("quantization=nf4,double_quant=False,seed=0"), are not
    # held fixed even where every child that ran here has one value (the others were skipped)
    axes = {
        part.split("=")[0] for r in training for part in r.tags.get("sweep_configuration", "").split(",") if "=" in part
    }
    # ... nor is what the sweep runs say varies between all their configurations (sweep_axes: the keys of the
    # configurations that were skipped, `lr` when it is tuned per configuration), nor the seed
    axes |= {axis for r in tree for axis in r.tags.get("sweep_axes", "").split(",") if axis} | {"seed"}
    fixed = {p: v for p, v in _fixed_settings(finished).items() if p not in axes}
    fixed = fixed or {"data_fingerprint": root.tags.get("data_fingerprint", "")}  # every child skipped
    return [
        r
        for r in everything
        if "sweep_key" in r.tags
        and r.status == "FINISHED"
        and r.run_id not in tree_ids
        and all(r.settings[p] == v for p, v in fixed.items())
    ]


def _fixed_settings(runs: list[RunData]) -> dict[str, str]:
    values: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        for p, v in r.settings.items():
            values[p].add(v)
    return {p: next(iter(v)) for p, v in values.items() if len(v) == 1}


def _latest_per_seed(runs: list[RunData]) -> tuple[list[RunData], int]:
    latest: dict[tuple[str, int], RunData] = {}
    for r in sorted(runs, key=lambda r: r.start_ms):
        latest[(r.config_hash, r.seed)] = r
    return list(latest.values()), len(runs) - len(latest)


def _declared_aliases(tree: list[RunData]) -> dict[str, set[str]]:
    """The target_modules names each sweep in scope trained under another name (its target_modules_aliases tag)."""
    declared: dict[str, set[str]] = defaultdict(set)
    for r in tree:
        try:
            aliases = json.loads(r.tags.get("target_modules_aliases") or "{}")
        except ValueError:
            continue
        for name, also in aliases.items() if isinstance(aliases, dict) else ():
            declared[name] |= {a for a in also if isinstance(a, str)}
    return declared


def one_per_resolved_modules(
    runs: list[RunData], declared: dict[str, set[str]] | None = None
) -> tuple[list[RunData], list[str]]:
    """One configuration per set of adapted modules: runs that differ only in the name of their target_modules and
    adapted the same modules (param target_modules_resolved; on Llama-style models attention_mlp and all_linear both
    adapt q, k, v, o, gate, up and down) are one configuration trained twice. The runs of the broadest name are kept
    (names.preferred_name), the others left out, and the kept runs carry every name that resolved to them
    (also_named), with the names a sweep trained under that one (`declared`, its target_modules_aliases tag).

    Returns:
        The runs kept and one note per name left out.
    """
    declared = declared or {}
    groups: dict[tuple, dict[str, list[RunData]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        s = r.settings
        resolved = r.params.get("target_modules_resolved", "")
        fixed = tuple(sorted((k, v) for k, v in s.items() if k != "target_modules"))
        # a run without the resolved list (or full fine-tuning, which adapts nothing by name) stays its own
        same = resolved if resolved and s.get("method", "lora") in ("", "lora") else f"{r.run_id}:{resolved}"
        groups[fixed, same][s["target_modules"]].append(r)
    kept, notes = [], []
    for (_, modules), by_name in groups.items():
        name = preferred_name(by_name)
        kept += by_name[name]
        also = set(by_name) - {name}
        for other in sorted(also):
            notes.append(
                f"{len(by_name[other])} runs of target_modules={other} left out: they adapt the same modules as "
                f"{name} ({modules}), one configuration trained under two names"
            )
        for r in by_name[name]:
            r.also_named = tuple(sorted(also | declared.get(name, set())))
    return kept, notes


def _failed_not_retried(training: list[RunData], finished: list[RunData]) -> tuple[list[RunData], list[str]]:
    """The FAILED or KILLED runs whose sweep_key never FINISHED, and notes on the retried and the still running."""
    notes = []
    finished_keys = {r.tags["sweep_key"] for r in finished}
    failed = [r for r in training if r.status in ("FAILED", "KILLED") and r.tags["sweep_key"] not in finished_keys]
    if retried := sum(r.status in ("FAILED", "KILLED") for r in training) - len(failed):
        notes.append(f"{retried} failed runs that later FINISHED on a retry were left out")
    if running := sum(r.status in ("RUNNING", "SCHEDULED") for r in training):
        notes.append(f"{running} runs still RUNNING were left out")
    return failed, notes


def _nothing_to_report(experiment: str, root: RunData | None, failed: list[RunData]) -> UserError:
    where = f" (run {root.name} {root.run_id})" if root is not None else ""
    if failed:
        first = failed[0].tags.get("error", "no error recorded").splitlines()[0][:300]
        return UserError(
            f"experiment {experiment!r}{where}: all {len(failed)} training runs FAILED, nothing to report "
            f"(first error: {first})"
        )
    return UserError(
        f"experiment {experiment!r}{where} has no FINISHED training runs to report: run the study "
        "(mlflow run . -e main --env-manager local) or a sweep first"
    )


def _baselines(everything: list[RunData], finished: list[RunData]) -> tuple[list[RunData], list[str]]:
    """The latest FINISHED baseline of each storage, evaluated like most of the runs, on their base models."""
    notes = []
    eval_settings = Counter(r.tags.get("eval_settings", "") for r in finished)
    if len(eval_settings) > 1:
        notes.append(f"the runs were evaluated with {len(eval_settings)} different settings: compare with care")
    usual, base_models = eval_settings.most_common(1)[0][0], {r.params.get("base_model") for r in finished}
    baselines: dict[str, RunData] = {}
    for r in sorted(everything, key=lambda r: r.start_ms):
        if (
            r.tags.get("baseline") == "true"
            and r.status == "FINISHED"
            and r.tags.get("eval_settings") == usual
            and r.tags.get("base_model") in base_models
        ):
            baselines[r.storage] = r  # the latest of each storage
    if not baselines:
        notes.append("no baseline (the base model without adapter, evaluated with the same settings) was found")
    return list(baselines.values()), notes


def fetch_loss_curves(client, runs: list[RunData], metric: str = "train/loss") -> dict[str, list[tuple[int, float]]]:
    """`metric` (train/loss, or val/loss) per step of every run, from its metric history."""
    return {r.run_id: sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, metric)) for r in runs}


PER_EXAMPLE_LOSSES = "per_example_losses.json"  # lora_efficiency.evaluation: one row per held-out example scored
MAX_TABLE_BYTES = 64 << 20  # 200 examples take ~10 KB; a file 6,000 times that is no evaluation's


def fetch_per_example_losses(client, runs: list[RunData]) -> dict[str, dict[str, list]]:
    """Each run's per-example losses ({example, task, tokens, loss} columns), by run id; a run without the artifact
    (logged before it existed), or with one not in that shape, is left out: its comparisons count seed noise only
    and say so."""
    found: dict[str, dict[str, list]] = {}
    # one progress bar per run (30 runs: 60 lines of "Downloading artifacts") would bury the report's own output
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    before = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        _download_tables(client, runs, found)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return found


def _download_tables(client, runs: list[RunData], found: dict[str, dict[str, list]]) -> None:
    with tempfile.TemporaryDirectory(prefix="per-example-") as tmp:
        for r in runs:
            try:
                path = Path(client.download_artifacts(r.run_id, PER_EXAMPLE_LOSSES, f"{tmp}/{r.run_id}"))
                if path.stat().st_size > MAX_TABLE_BYTES:
                    continue
                split = json.loads(path.read_text())
                table = {name: [row[i] for row in split["data"]] for i, name in enumerate(split["columns"])}
            except Exception:  # missing, unreadable or not a table: the run counts seed noise only
                continue
            if all(k in table for k in ("example", "tokens", "loss")):
                found[r.run_id] = table


@dataclass(frozen=True)
class MemoryPoint:
    run_name: str
    quantization: str
    measured_mb: float
    predicted_mb: float
    logged: bool = False  # the run's own memory/predicted_peak_mb; else estimated here with every position a target


def predict_peak_memory(runs: list[RunData]) -> tuple[list[MemoryPoint], list[str]]:
    """The memory planner's prediction for each run, next to its measured memory/peak_mb.

    A run logs the planner's figure itself (memory/predicted_peak_mb, with its data's share of target positions).
    For runs from before that metric, lora_efficiency.planner.estimate is given what the run logs and takes every
    position as a loss target (its default, an upper bound). A run whose estimate fails (its model is gone, a hub
    model offline...) is skipped with a note.

    Args:
        runs: the runs to place on the memory chart.

    Returns:
        One point per run that has one, and one note per reason runs were left out.
    """
    model_config = _model_configs()
    points, skipped = [], defaultdict(list)  # reason -> runs
    for r in runs:
        p = r.params
        if PREDICTED_MB in r.metrics and PEAK_MB in r.metrics:
            points.append(
                MemoryPoint(r.name, p.get("quantization", "?"), r.metrics[PEAK_MB], r.metrics[PREDICTED_MB], True)
            )
            continue
        try:
            predicted = estimate(model_config(p), **_planner_arguments(p))
            measured = r.metrics[PEAK_MB]
        except Exception as exc:  # any reason at all: the chart goes on without this run
            reason = f"{type(exc).__name__}: " + (str(exc).splitlines()[0][:160] if str(exc) else "")
            skipped[reason].append(f"{r.name} ({r.run_id[:8]})")
            continue
        points.append(MemoryPoint(r.name, p["quantization"], measured, predicted.total_mb))
    notes = [
        f"memory chart: no estimate for {len(names)} run{'s' * (len(names) > 1)} ({', '.join(names[:5])}"
        f"{', ...' if len(names) > 5 else ''}), left out: {reason}"
        for reason, names in skipped.items()
    ]
    return points, notes


def _model_configs() -> Callable[[dict[str, str]], object]:
    """A run's transformers config, read once per model; a failure is remembered and raised again, so an
    unreachable hub model is tried once."""
    configs: dict[str, object] = {}

    def config_of(params: dict[str, str]) -> object:
        model = params["model"]
        if model not in configs:
            try:
                path = resolve_model(model).path
                trust = parse_bool(params["trust_remote_code"]) is True
                configs[model] = AutoConfig.from_pretrained(path, trust_remote_code=trust)
            except Exception as exc:
                configs[model] = exc
        if isinstance(configs[model], Exception):
            raise configs[model]
        return configs[model]

    return config_of


def _planner_arguments(p: dict[str, str]) -> dict[str, object]:
    """The planner's settings as a run logs them (text), converted."""
    return {
        "rank": int(p["rank"]),
        "target_modules": p["target_modules"],
        "quantization": p["quantization"],
        "batch_size": int(p["batch_size"]),
        "seq_len": int(p["seq_len"]),
        "double_quant": parse_bool(p["double_quant"]) is True,
        "device": p.get("device_resolved", "cpu"),
        "dropout": float(p["dropout"]),
        "gradient_checkpointing": parse_bool(p.get("gradient_checkpointing", "false")) is True,
    }
