"""The study's report: runs read back through the MLflow API, grouped by configuration, aggregated over seeds,
compared with the seed-to-seed noise, drawn, and written as report.md and a self-contained report.html.

    mlflow run . -e report --env-manager local -P experiment=study-quick

Call order: fetch_scope -> fetch_loss_curves, predict_peak_memory -> build_report -> write_report.

Statistics. A configuration's metric over n seeds: mean, sample standard deviation and the 95 % interval of the
mean from Student's t with n - 1 degrees of freedom (with 2 seeds t = 12.71, so intervals are wide). Two
configurations differ by more than the noise when the 95 % interval of the difference of their means (Welch,
unequal variances) excludes zero, which is Welch's t-test at the 5 % level. The base model alone is evaluated
once and deterministically, so it is compared as a constant. Only seed-to-seed noise is counted: exact match
over 30 examples also has sampling noise that the seeds do not show.

Only this module draws. It uses matplotlib.figure.Figure, whose savefig renders with the Agg canvas: no pyplot
state, no display needed.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lora_efficiency.errors import UserError

# --------------------------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str
    unit: str  # "" for a pure number; fractions are shown in % (and their differences in points)
    higher_is_better: bool
    digits: int = 3
    fraction: bool = False

    @property
    def axis(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label

    def show(self, value: float) -> str:
        if self.fraction:
            return f"{value * 100:.1f}"
        return f"{value:,.{self.digits}f}"


METRICS = {
    m.name: m
    for m in (
        MetricSpec("eval/perplexity", "perplexity", "", higher_is_better=False),
        MetricSpec("eval/exact_match", "exact match", "%", higher_is_better=True, fraction=True),
        MetricSpec("eval/exact_match_normalized", "exact match, normalised", "%", True, fraction=True),
        MetricSpec("memory/peak_mb", "peak memory", "MB", higher_is_better=False, digits=0),
        MetricSpec("params/trainable", "trainable parameters", "", higher_is_better=False, digits=0),
        MetricSpec("perf/train_tokens_per_second", "training speed", "tokens/s", higher_is_better=True, digits=0),
        MetricSpec("inference/tokens_per_second", "generation speed", "tokens/s", higher_is_better=True, digits=1),
        MetricSpec("time/train_s", "training time", "s", higher_is_better=False, digits=0),
    )
}
PERPLEXITY, EXACT_MATCH, PEAK_MB = "eval/perplexity", "eval/exact_match", "memory/peak_mb"
QUALITY = (PERPLEXITY, EXACT_MATCH)
# compared in every finding: quality, then what it costs
FINDING_METRICS = (PERPLEXITY, EXACT_MATCH, PEAK_MB, "perf/train_tokens_per_second")


# The params that make a configuration, for labels and comparisons (the config_hash tag groups the runs): the
# train settings that shape the adapter, the model and data by content (the same base named two ways is one
# configuration). Seed, device, evaluation and checkpointing settings are left out.
SETTINGS = (
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "quantization",
    "double_quant",
    "use_rslora",
    "use_dora",
    "max_steps",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "seq_len",
    "packing",
    "train_on_prompt",
    "gradient_checkpointing",
    "base_model",
    "data_fingerprint",
)
FOUR_BIT = ("nf4", "fp4")


# --------------------------------------------------------------------------------------------------------------
# Runs


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

    @property
    def config_hash(self) -> str:
        return self.tags.get("config_hash") or "|".join(self.params.get(p, "") for p in SETTINGS)

    @property
    def seed(self) -> int:
        return int(self.params.get("seed") or self.tags.get("seed") or 0)

    @property
    def settings(self) -> dict[str, str]:
        return {p: self.params.get(p, "") for p in SETTINGS}


def run_data(run) -> RunData:
    return RunData(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        status=run.info.status,
        start_ms=run.info.start_time or 0,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
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


def _all_runs(client, experiment_id: str) -> list[RunData]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs += [run_data(r) for r in page]
        token = page.token
        if not token:
            return runs


def fetch_scope(client, *, experiment: str, sweep_run_id: str = "") -> Scope:
    """The runs of one report, from `client.search_runs` alone.

    By default the latest study run (entry point main) and its descendants; with no study run, every sweep child
    of the experiment; with `sweep_run_id`, that sweep or study run and its descendants. A sweep skips a
    configuration that another sweep already FINISHED (same sweep_key), so FINISHED sweep children elsewhere in
    the experiment join when they share every setting that the scope's own runs hold fixed, other than the
    sweeps' axes: the modules sweep gets back its rank 16 / attention / nf4 runs from the rank sweep, a resumed
    study the runs of its first try.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise UserError(f"experiment={experiment!r} does not exist: known experiments are {known}")
    everything = _all_runs(client, exp.experiment_id)
    by_id = {r.run_id: r for r in everything}
    children: dict[str, list[RunData]] = defaultdict(list)
    for r in everything:
        if parent := r.tags.get("mlflow.parentRunId"):
            children[parent].append(r)

    notes: list[str] = []
    if sweep_run_id:
        root = by_id.get(sweep_run_id)
        if root is None:
            raise UserError(f"sweep_run_id={sweep_run_id!r} is not a run of experiment {experiment!r}")
    else:
        studies = [r for r in everything if r.tags.get("entry_point") == "main"]
        root = max(studies, key=lambda r: r.start_ms) if studies else None
    if root is None:
        tree = everything
    else:
        tree, todo = [], list(children[root.run_id])
        while todo:
            run = todo.pop()
            tree.append(run)
            todo += children[run.run_id]

    training = [r for r in tree if "sweep_key" in r.tags]
    finished = [r for r in training if r.status == "FINISHED"]
    where = f" (run {root.name} {root.run_id})" if root is not None else ""
    if root is not None:
        tree_ids = {r.run_id for r in tree}
        # the sweeps' axes, from the children's labels ("quantization=nf4,double_quant=False,seed=0"), are not
        # held fixed even where every child that ran here has one value (the others were skipped)
        axes = {
            part.split("=")[0]
            for r in training
            for part in r.tags.get("sweep_configuration", "").split(",")
            if "=" in part
        }
        fixed = {p: v for p, v in _fixed_settings(finished).items() if p not in axes}
        fixed = fixed or {"data_fingerprint": root.tags.get("data_fingerprint", "")}  # every child skipped
        joined = [
            r
            for r in everything
            if "sweep_key" in r.tags
            and r.status == "FINISHED"
            and r.run_id not in tree_ids
            and all(r.settings[p] == v for p, v in fixed.items())
        ]
        if joined:
            notes.append(
                f"{len(joined)} runs of other sweeps joined: the same settings FINISHED elsewhere in the experiment "
                "are skipped by a sweep, so they are counted here"
            )
        finished += joined

    finished, repeats = _latest_per_seed(finished)
    if repeats:
        notes.append(f"{repeats} older runs of a configuration and seed that ran again were left out")
    finished_keys = {r.tags["sweep_key"] for r in finished}
    failed = [r for r in training if r.status in ("FAILED", "KILLED") and r.tags["sweep_key"] not in finished_keys]
    if retried := sum(r.status in ("FAILED", "KILLED") for r in training) - len(failed):
        notes.append(f"{retried} failed runs that later FINISHED on a retry were left out")
    if running := sum(r.status in ("RUNNING", "SCHEDULED") for r in training):
        notes.append(f"{running} runs still RUNNING were left out")
    if not finished:
        if failed:
            first = failed[0].tags.get("error", "no error recorded").splitlines()[0][:300]
            raise UserError(
                f"experiment {experiment!r}{where}: all {len(failed)} training runs FAILED, nothing to report "
                f"(first error: {first})"
            )
        raise UserError(
            f"experiment {experiment!r}{where} has no FINISHED training runs to report: run the study "
            "(mlflow run . -e main --env-manager local) or a sweep first"
        )

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
            baselines[r.tags.get("quantization", r.params.get("quantization", ""))] = r  # the latest of each storage
    if not baselines:
        notes.append("no baseline (the base model without adapter, evaluated with the same settings) was found")
    sweeps = [r for r in tree if r.tags.get("entry_point") == "sweep"]
    return Scope(experiment, root, finished, failed, list(baselines.values()), sweeps, notes)


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


def fetch_loss_curves(client, runs: list[RunData]) -> dict[str, list[tuple[int, float]]]:
    """train/loss per step of every run, from its metric history."""
    return {
        r.run_id: sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, "train/loss")) for r in runs
    }


@dataclass(frozen=True)
class MemoryPoint:
    run_name: str
    quantization: str
    measured_mb: float
    predicted_mb: float
    logged: bool = False  # the run's own memory/predicted_peak_mb; else estimated here with every position a target


PREDICTED_MB = "memory/predicted_peak_mb"


def predict_peak_memory(runs: list[RunData]) -> tuple[list[MemoryPoint], list[str]]:
    """The memory planner's prediction for each run, next to its measured memory/peak_mb.

    A run logs the planner's figure itself (memory/predicted_peak_mb, with its data's share of target positions).
    For runs from before that metric, lora_efficiency.memory.estimate is given what the run logs and takes every
    position as a loss target (its default, an upper bound). A run whose estimate fails (its model is gone, a hub
    model offline...) is skipped with a note.
    """
    from transformers import AutoConfig

    from lora_efficiency.models import resolve_model
    from lora_efficiency.planner import estimate

    configs: dict[str, object] = {}
    points, skipped = [], defaultdict(list)  # reason -> runs
    for r in runs:
        p = r.params
        if PREDICTED_MB in r.metrics and PEAK_MB in r.metrics:
            points.append(
                MemoryPoint(r.name, p.get("quantization", "?"), r.metrics[PEAK_MB], r.metrics[PREDICTED_MB], True)
            )
            continue
        try:
            model = p["model"]
            if model not in configs:
                try:
                    path = resolve_model(model).path
                    configs[model] = AutoConfig.from_pretrained(path, trust_remote_code=_bool(p["trust_remote_code"]))
                except Exception as exc:  # remembered, so an unreachable hub model is tried once
                    configs[model] = exc
            if isinstance(configs[model], Exception):
                raise configs[model]
            predicted = estimate(
                configs[model],
                rank=int(p["rank"]),
                target_modules=p["target_modules"],
                quantization=p["quantization"],
                batch_size=int(p["batch_size"]),
                seq_len=int(p["seq_len"]),
                double_quant=_bool(p["double_quant"]),
                device=p.get("device_resolved", "cpu"),
                dropout=float(p["dropout"]),
                gradient_checkpointing=_bool(p.get("gradient_checkpointing", "false")),
            )
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


def _bool(text: str) -> bool:
    return str(text).strip().lower() in ("true", "1", "yes", "on")


# --------------------------------------------------------------------------------------------------------------
# Aggregation over seeds


def t_quantile(df: float) -> float:
    """Two-sided 95 % quantile of Student's t."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class Stat:
    """One metric of one configuration over its seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float | None:
        if self.n < 2:
            return None
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (self.n - 1))

    @property
    def half_width(self) -> float | None:
        """Half the 95 % interval of the mean; None with one seed."""
        return None if self.std is None else t_quantile(self.n - 1) * self.std / math.sqrt(self.n)

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


@dataclass
class Configuration:
    """The runs of one config_hash (one per seed) and their statistics."""

    key: str
    label: str
    settings: dict[str, str]
    runs: list[RunData]
    stats: dict[str, Stat]  # only metrics that at least one seed measured

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def mean(self, metric: str) -> float | None:
        return self.stats[metric].mean if metric in self.stats else None

    @property
    def worst_peak_mb(self) -> float | None:
        """The largest peak over seeds: what a budget must hold for every seed to fit."""
        return max(self.stats[PEAK_MB].values) if PEAK_MB in self.stats else None


def group_configurations(runs: list[RunData]) -> list[Configuration]:
    """One Configuration per config_hash; labels name only the settings that vary in this set of runs."""
    groups: dict[str, list[RunData]] = defaultdict(list)
    for r in runs:
        groups[r.config_hash].append(r)
    settings = {k: rs[0].settings for k, rs in groups.items()}
    varying = [p for p in SETTINGS if len({s[p] for s in settings.values()}) > 1]
    configs = []
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r.seed)
        stats = {}
        for metric in METRICS:
            values = tuple(r.metrics[metric] for r in rs if metric in r.metrics)
            if values:
                stats[metric] = Stat(values)
        configs.append(
            Configuration(key, " ".join(_label_parts(settings[key], varying).values()), settings[key], rs, stats)
        )
    return sorted(configs, key=lambda c: (c.mean(PERPLEXITY) is None, c.mean(PERPLEXITY) or 0, c.label))


def _label_parts(s: dict[str, str], varying: list[str]) -> dict[str, str]:
    """Rank, modules and storage always (the study's axes, as in run names: r16 attention nf4), then every other
    setting that varies as name=value."""
    parts = {"rank": f"r{s['rank']}", "target_modules": s["target_modules"], "quantization": s["quantization"]}
    if s["quantization"] in FOUR_BIT and not _bool(s["double_quant"] or "true"):
        parts["double_quant"] = "no-dq"
    for p in varying:
        if p not in ("rank", "target_modules", "quantization", "double_quant"):
            parts[p] = f"{p}={s[p]}"
    return parts


# --------------------------------------------------------------------------------------------------------------
# Comparisons, differences, findings


@dataclass
class Comparison:
    """Configurations that differ only along `axis`, sorted along it, and the one the others are compared with."""

    name: str
    axis: tuple[str, ...]
    configurations: list[Configuration]
    reference: Configuration
    varying: list[str]  # the settings that vary anywhere in the report, for labels

    def value(self, c: Configuration) -> str:
        """The configuration's position on the axis: r32, q_v, nf4 no-dq."""
        parts = _label_parts(c.settings, self.varying)
        return " ".join(v for p, v in parts.items() if p in self.axis) or c.label

    @property
    def fixed(self) -> str:
        """What the comparison holds fixed: attention nf4."""
        parts = _label_parts(self.reference.settings, self.varying)
        return " ".join(v for p, v in parts.items() if p not in self.axis)


AXES = {"rank": ("rank",), "modules": ("target_modules",), "quantization": ("quantization", "double_quant")}


def find_comparisons(configs: list[Configuration], *, defaults: dict[str, object]) -> list[Comparison]:
    """For rank, modules, quantization and any other setting that varies: the largest set of configurations
    that differ only along it. The reference is bf16 for quantization (the 16-bit base QLoRA is measured
    against), else the configuration with the train defaults' value (r16, attention), else the first."""
    varying = [p for p in SETTINGS if len({c.settings[p] for c in configs}) > 1]
    axes = dict(AXES)
    for p in varying:
        if not any(p in a for a in axes.values()):
            axes[p] = (p,)
    comparisons = []
    for name, axis in axes.items():
        groups: dict[tuple, list[Configuration]] = defaultdict(list)
        for c in configs:
            groups[tuple(v for p, v in c.settings.items() if p not in axis)].append(c)
        best = max(groups.values(), key=lambda g: (len(g), _matches(g, defaults, axis)))
        if len(best) < 2:
            continue
        ordered = sorted(best, key=lambda c: _axis_order(name, c))
        reference = next((c for c in ordered if name == "quantization" and c.settings["quantization"] == "bf16"), None)
        reference = reference or next(
            (c for c in ordered if all(c.settings[p] == str(defaults.get(p)) for p in axis)), ordered[0]
        )
        comparisons.append(Comparison(name, axis, ordered, reference, varying))
    return comparisons


def _matches(group: list[Configuration], defaults: dict[str, object], axis: tuple[str, ...]) -> int:
    """How many fixed settings of a group are the train defaults: breaks ties towards the study's base."""
    s = group[0].settings
    return sum(s[p] == str(defaults[p]) for p in s if p in defaults and p not in axis)


def _axis_order(name: str, c: Configuration) -> tuple:
    from lora_efficiency.models import QUANTIZATIONS

    s = c.settings
    if name == "rank":
        return (int(s["rank"]),)
    if name == "modules":
        return (c.mean("params/trainable") or 0, s["target_modules"])
    if name == "quantization":
        storage = QUANTIZATIONS.index(s["quantization"]) if s["quantization"] in QUANTIZATIONS else 99
        return (storage, not _bool(s["double_quant"]))
    value = s[name]
    return (0, float(value), "") if re.fullmatch(r"[-+0-9.e]+", value) else (1, 0.0, value)


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) of one metric, its Welch 95 % interval, and whether that excludes zero."""

    metric: str
    diff: float | None
    low: float | None
    high: float | None
    reference_mean: float | None
    verdict: str  # "larger than noise", "within noise", "no difference", "cannot tell (...)" or "not measured"

    @property
    def decided(self) -> bool:
        return self.verdict in ("larger than noise", "within noise", "no difference")

    @property
    def within_noise(self) -> bool:
        return self.verdict in ("within noise", "no difference")

    def text(self) -> str:
        """perplexity -0.8% (interval -3.1% to +1.5%), within noise."""
        spec = METRICS[self.metric]
        if self.diff is None:
            return f"{spec.label} not measured"
        if spec.fraction:
            size = f"{self.diff * 100:+.1f} points"
            interval = None if self.low is None else f"{self.low * 100:+.1f} to {self.high * 100:+.1f}"
        else:
            scale = 100 / abs(self.reference_mean) if self.reference_mean else float("nan")
            size = f"{self.diff * scale:+.1f}%"
            interval = None if self.low is None else f"{self.low * scale:+.1f}% to {self.high * scale:+.1f}%"
        interval = f" (interval {interval})" if interval else ""
        return f"{spec.label} {size}{interval}, {self.verdict}"


def difference(a: Stat | None, b: Stat | None, *, metric: str, b_exact: bool = False) -> Difference:
    """a - b. `b_exact`: b is a constant (the base model, evaluated once and deterministically), not a mean."""
    if a is None or b is None:
        return Difference(metric, None, None, None, None, "not measured")
    diff = a.mean - b.mean
    if a.n < 2 or (b.n < 2 and not b_exact):
        return Difference(metric, diff, None, None, b.mean, "cannot tell (one seed)")
    var_a = a.std**2 / a.n
    var_b = 0.0 if b_exact else b.std**2 / b.n
    se = math.sqrt(var_a + var_b)
    if se == 0:  # every seed measured the same (1 of 30 answers right, twice): the noise is not measured
        verdict = "no difference" if diff == 0 else "cannot tell (the seeds agree exactly: no noise estimate)"
        return Difference(metric, diff, None, None, b.mean, verdict)
    parts = [var_a**2 / (a.n - 1)] + ([] if b_exact else [var_b**2 / (b.n - 1)])
    df = (var_a + var_b) ** 2 / sum(parts)  # Welch-Satterthwaite
    half = t_quantile(df) * se
    low, high = diff - half, diff + half
    verdict = "larger than noise" if low > 0 or high < 0 else "within noise"
    return Difference(metric, diff, low, high, b.mean, verdict)


@dataclass(frozen=True)
class Finding:
    comparison: str
    a: str  # labels along the comparison's axis
    b: str
    differences: dict[str, Difference]
    text: str


def compare(comparison: Comparison) -> list[Finding]:
    """Every configuration of a comparison against its reference, on quality and cost."""
    ref = comparison.reference
    findings = []
    for c in comparison.configurations:
        if c is ref:
            continue
        diffs = {m: difference(c.stats.get(m), ref.stats.get(m), metric=m) for m in FINDING_METRICS}
        parts = [diffs[m].text() for m in FINDING_METRICS]
        if comparison.name in ("rank", "modules") and "params/trainable" in c.stats and ref.mean("params/trainable"):
            parts.append(f"trainable parameters x{c.mean('params/trainable') / ref.mean('params/trainable'):.2f}")
        a, b = comparison.value(c), comparison.value(ref)
        findings.append(Finding(comparison.name, a, b, diffs, f"{a} vs {b}: " + "; ".join(parts) + "."))
    return findings


def baseline_findings(configs: list[Configuration], baselines: list[RunData]) -> list[str]:
    """The adapters of each storage against the base model alone in that storage (a constant: one deterministic
    evaluation)."""
    lines = []
    for base in sorted(baselines, key=lambda r: r.tags.get("quantization", "")):
        storage = base.tags.get("quantization", base.params.get("quantization", ""))
        parts = []
        for metric in QUALITY:
            same = [c for c in configs if c.settings["quantization"] == storage and metric in c.stats]
            if not same or metric not in base.metrics:
                continue
            spec, value = METRICS[metric], base.metrics[metric]
            diffs = [difference(c.stats[metric], Stat((value,)), metric=metric, b_exact=True) for c in same]
            means = sorted(c.mean(metric) for c in same)
            low, high = spec.show(means[0]), spec.show(means[-1])
            span = low if low == high else f"{low} to {high}"
            unit = "%" if spec.fraction else ""
            beyond = sum(d.verdict == "larger than noise" and _better(d) > 0 for d in diffs)
            parts.append(
                f"{spec.label} {spec.show(value)}{unit} without adapter, {span}{unit} with one; {beyond} of "
                f"{len(same)} better beyond noise"
            )
        if parts:
            lines.append(f"No adapter vs adapters on the {storage} base: " + "; ".join(parts) + ".")
    return lines


# --------------------------------------------------------------------------------------------------------------
# Published anchors


@dataclass(frozen=True)
class AnchorCheck:
    source: str
    claim: str  # the published statement
    test: str  # how this study tests it
    verdicts: dict[str, str]  # quality metric -> agrees / disagrees / cannot tell
    evidence: dict[str, str]  # quality metric -> the numbers behind the verdict

    @property
    def verdict(self) -> str:
        decided = {v for v in self.verdicts.values() if v != "cannot tell"}
        return "cannot tell" if not decided else decided.pop() if len(decided) == 1 else "mixed"


ANCHOR_CLAIMS = {
    "rank": (
        "LoRA paper (Hu et al. 2021), Table 6",
        "once all attention matrices are adapted, rank barely matters: r = 1 to 64 score about the same",
        "every rank on the attention matrices against the best rank",
    ),
    "modules": (
        "QLoRA paper (Dettmers et al. 2023)",
        "LoRA on all linear layers is needed to match 16-bit fine-tuning; attention-only adapters fall short",
        "the configuration adapting the most linear layers against every one adapting a subset of them",
    ),
    "quantization": (
        "QLoRA paper (Dettmers et al. 2023)",
        "an NF4 base (with double quantization) matches a BF16 base",
        "nf4 against bf16 at the same rank and modules: agrees unless nf4 is worse beyond noise",
    ),
}


def _measured_noise(d: Difference) -> bool:
    """Decided against a measured noise: 'no difference' between seeds that all agree exactly does not count."""
    return d.verdict in ("larger than noise", "within noise")


def _better(d: Difference) -> float:
    """A difference signed so that positive means the first configuration is better."""
    return d.diff if METRICS[d.metric].higher_is_better else -d.diff


def check_anchors(comparisons: list[Comparison]) -> list[AnchorCheck]:
    by_name = {c.name: c for c in comparisons}
    checks = []
    for name, (source, claim, test) in ANCHOR_CLAIMS.items():
        verdicts, evidence = {}, {}
        for metric in QUALITY:
            verdict, why = _anchor_verdict(name, by_name.get(name), metric)
            verdicts[metric], evidence[metric] = verdict, why
        checks.append(AnchorCheck(source, claim, test, verdicts, evidence))
    return checks


def _anchor_verdict(name: str, comp: Comparison | None, metric: str) -> tuple[str, str]:
    """(agrees / disagrees / cannot tell, the numbers behind it) for one anchor and one quality metric."""
    label = METRICS[metric].label
    if comp is None:
        return "cannot tell", f"no {name} comparison in these runs"
    measured = [c for c in comp.configurations if metric in c.stats]
    if len(measured) < 2:
        return "cannot tell", f"{label} not measured"
    if any(c.stats[metric].n < 2 for c in measured):
        return "cannot tell", "one seed: no noise estimate"
    sign = 1 if METRICS[metric].higher_is_better else -1

    if name == "rank":
        if comp.reference.settings["target_modules"] not in ("attention", "attention_mlp", "all_linear"):
            return "cannot tell", "the ranks were not swept on all attention matrices"
        best = max(measured, key=lambda c: sign * c.mean(metric))
        diffs = [(c, difference(c.stats[metric], best.stats[metric], metric=metric)) for c in measured if c is not best]
        worse = [comp.value(c) for c, d in diffs if d.verdict == "larger than noise"]
        c, d = max(diffs, key=lambda cd: abs(cd[1].diff))
        largest = f"largest gap {comp.value(c)}: {d.text()}"
        if worse:
            return "disagrees", f"{', '.join(worse)} worse than {comp.value(best)} beyond noise; {largest}"
        if all(_measured_noise(d) for _, d in diffs):
            return "agrees", f"every rank within noise of the best, {comp.value(best)}; {largest}"
        return "cannot tell", f"the seeds agree exactly, no noise estimate; {largest}"

    if name == "modules":
        modules = {c.key: set(c.runs[0].params.get("target_modules_resolved", "").split(",")) for c in measured}
        widest = max(measured, key=lambda c: len(modules[c.key]))
        subsets = [c for c in measured if modules[c.key] < modules[widest.key]]
        if not subsets:
            return "cannot tell", "no configuration adapts a strict subset of the widest one's modules"
        diffs = [(c, difference(widest.stats[metric], c.stats[metric], metric=metric)) for c in subsets]
        beaten = [(c, d) for c, d in diffs if d.verdict == "larger than noise" and _better(d) > 0]
        matched = [
            (c, d)
            for c, d in diffs
            if d.verdict == "within noise" or (d.verdict == "larger than noise" and _better(d) < 0)
        ]
        if matched:
            c, d = matched[0]
            names = ", ".join(comp.value(c) for c, _ in matched)
            return (
                "disagrees",
                f"{names} not beaten beyond noise by {comp.value(widest)}; vs {comp.value(c)}: {d.text()}",
            )
        if len(beaten) == len(diffs):
            c, d = min(beaten, key=lambda cd: abs(cd[1].diff))
            return (
                "agrees",
                f"{comp.value(widest)} beats all {len(diffs)} subsets beyond noise; "
                f"closest {comp.value(c)}: {d.text()}",
            )
        return "cannot tell", "the seeds agree exactly, no noise estimate"

    nf4 = next((c for c in measured if c.settings["quantization"] == "nf4" and _bool(c.settings["double_quant"])), None)
    nf4 = nf4 or next((c for c in measured if c.settings["quantization"] == "nf4"), None)
    bf16 = next((c for c in measured if c.settings["quantization"] == "bf16"), None)
    if nf4 is None or bf16 is None:
        return "cannot tell", "nf4 or bf16 not measured"
    d = difference(nf4.stats[metric], bf16.stats[metric], metric=metric)
    evidence = f"{comp.value(nf4)} vs bf16: {d.text()}"
    if not _measured_noise(d):
        return "cannot tell", evidence
    return ("disagrees" if d.verdict == "larger than noise" and _better(d) < 0 else "agrees"), evidence


# --------------------------------------------------------------------------------------------------------------
# Pareto front and budgets


def pareto_front(points: list[tuple[float, float]], *, higher_is_better: bool) -> list[int]:
    """Indices of the points that no other point beats: less or equal cost (x, lower is better) and better or
    equal quality (y), better in one of them. Sorted by cost."""
    sign = -1 if higher_is_better else 1
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and sign * y2 <= sign * y) and (x2 < x or sign * y2 < sign * y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def frontier(configs: list[Configuration], metric: str) -> list[Configuration]:
    """The Pareto front of mean quality against mean peak memory."""
    usable = [c for c in configs if metric in c.stats and PEAK_MB in c.stats]
    points = [(c.mean(PEAK_MB), c.mean(metric)) for c in usable]
    return [usable[i] for i in pareto_front(points, higher_is_better=METRICS[metric].higher_is_better)]


def budget_ladder(peaks_mb: list[float]) -> list[float]:
    """Round budgets from just under the smallest peak to the largest, at most ~7: 2,500, 2,750, 3,000... MB."""
    low, high = min(peaks_mb), max(peaks_mb)
    steps = [m * 10**e for e in range(1, 8) for m in (1, 2, 2.5, 5)]
    step = next(s for s in steps if (high - low) / s <= 5)
    budgets = [math.floor(low / step) * step]  # the step below the smallest peak: nothing fits there
    while budgets[-1] < high:
        budgets.append(budgets[-1] + step)
    return [float(b) for b in budgets]


@dataclass(frozen=True)
class Recommendation:
    budget_mb: float
    best: Configuration | None
    within_noise: list[Configuration]  # fit too, and their perplexity is not worse than the best's beyond noise
    fitting: int


def recommend(configs: list[Configuration], budgets_mb: list[float]) -> list[Recommendation]:
    """The lowest mean perplexity among configurations whose every seed peaked under the budget."""
    out = []
    for budget in budgets_mb:
        fit = [
            c for c in configs if PERPLEXITY in c.stats and c.worst_peak_mb is not None and c.worst_peak_mb <= budget
        ]
        best = min(fit, key=lambda c: c.mean(PERPLEXITY)) if fit else None
        close = [
            c
            for c in fit
            if c is not best and difference(c.stats[PERPLEXITY], best.stats[PERPLEXITY], metric=PERPLEXITY).within_noise
        ]
        out.append(Recommendation(budget, best, close, len(fit)))
    return out


# --------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class Report:
    scope: Scope
    configurations: list[Configuration]
    comparisons: list[Comparison]
    findings: list[Finding]
    baseline_lines: list[str]
    anchors: list[AnchorCheck]
    fronts: dict[str, list[Configuration]]  # quality metric -> Pareto front
    recommendations: list[Recommendation]
    loss_curves: dict[str, list[tuple[int, float]]]
    memory_points: list[MemoryPoint]
    notes: list[str]


def build_report(
    scope: Scope,
    *,
    defaults: dict[str, object],
    budgets_mb: list[float] | None = None,
    loss_curves: dict[str, list[tuple[int, float]]] | None = None,
    memory_points: list[MemoryPoint] | None = None,
    memory_notes: list[str] | None = None,
) -> Report:
    """Aggregate, compare and decide; `defaults` are the train defaults (the reference configuration)."""
    configs = group_configurations(scope.runs)
    comparisons = find_comparisons(configs, defaults=defaults)
    findings = [f for comp in comparisons for f in compare(comp)]
    fronts = {m: frontier(configs, m) for m in QUALITY if any(m in c.stats for c in configs)}
    peaks = [c.worst_peak_mb for c in configs if c.worst_peak_mb is not None]
    budgets = budgets_mb or (budget_ladder(peaks) if peaks else [])
    return Report(
        scope=scope,
        configurations=configs,
        comparisons=comparisons,
        findings=findings,
        baseline_lines=baseline_findings(configs, scope.baselines),
        anchors=check_anchors(comparisons),
        fronts=fronts,
        recommendations=recommend(configs, budgets),
        loss_curves=loss_curves or {},
        memory_points=memory_points or [],
        notes=scope.notes
        + ([] if EXACT_MATCH in {m for c in configs for m in c.stats} else ["exact match not measured by any run"])
        + (memory_notes or []),
    )


def cell(stat: Stat | None, metric: str) -> str:
    """'3.210 [3.160, 3.260]' (mean [95 % interval]); one value when every seed agrees; 'x (1 seed)'."""
    spec = METRICS[metric]
    if stat is None:
        return "not measured"
    if stat.n == 1:
        return f"{spec.show(stat.mean)} (1 seed)"
    if len(set(stat.values)) == 1:
        return spec.show(stat.mean)
    return f"{spec.show(stat.mean)} [{spec.show(stat.low)}, {spec.show(stat.high)}]"


TABLE_METRICS = (
    PERPLEXITY,
    EXACT_MATCH,
    "eval/exact_match_normalized",
    PEAK_MB,
    "params/trainable",
    "perf/train_tokens_per_second",
    "inference/tokens_per_second",
    "time/train_s",
)


def configuration_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """The table of every configuration (best perplexity first; # is the number in the charts), then the
    baselines."""
    header = ["#", "configuration", "seeds"] + [METRICS[m].axis for m in TABLE_METRICS] + ["Pareto front of"]
    rows = [
        [str(i), c.label, ", ".join(map(str, c.seeds))]
        + [cell(c.stats.get(m), m) for m in TABLE_METRICS]
        + [", ".join(METRICS[m].label for m, front in report.fronts.items() if c in front)]
        for i, c in enumerate(report.configurations, 1)
    ]
    for base in report.scope.baselines:
        storage = base.tags.get("quantization", base.params.get("quantization", ""))
        values = [
            cell(Stat((base.metrics[m],)), m).replace(" (1 seed)", "") if m in base.metrics else "-"
            for m in TABLE_METRICS
        ]
        rows.append(["", f"baseline: no adapter, {storage}", "-"] + values + [""])
    return header, rows


def comparison_rows(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    header = [comp.name, "seeds"] + [METRICS[m].axis for m in (*FINDING_METRICS, "params/trainable")]
    rows = [
        [comp.value(c) + (" (reference)" if c is comp.reference else ""), str(len(c.runs))]
        + [cell(c.stats.get(m), m) for m in (*FINDING_METRICS, "params/trainable")]
        for c in comp.configurations
    ]
    return header, rows


def _document(report: Report, charts: dict[str, Path]) -> list[tuple]:
    """The report as blocks, rendered to Markdown and to HTML by the same code."""
    s = report.scope
    seeds = Counter(len(c.runs) for c in report.configurations)
    kind = {"main": "study run", "sweep": "sweep run"}
    root = f"{kind.get(s.root.tags.get('entry_point', ''), 'run')} {s.root.name} ({s.root.run_id})" if s.root else None
    devices = sorted({r.tags.get("device_name", "?") for r in s.runs})
    sweeps = [
        f"sweep {r.tags.get('sweep_name', r.name)}: {r.tags.get('children_total', '?')} runs, "
        f"{r.tags.get('children_finished', '?')} trained, {r.tags.get('children_skipped', '?')} skipped (already "
        f"FINISHED elsewhere), {r.tags.get('children_failed', '?')} failed"
        for r in sorted(s.sweeps, key=lambda r: r.start_ms)
    ]
    blocks: list[tuple] = [
        ("h1", f"LoRA efficiency report: {s.experiment}"),
        (
            "p",
            f"Scope: experiment {s.experiment}, {root or 'every sweep run (no study run)'}: {len(s.runs)} FINISHED "
            f"training runs in {len(report.configurations)} configurations ("
            + ", ".join(f"{n} with {k} seed{'s' * (k > 1)}" for k, n in sorted(seeds.items()))
            + f"), {len(s.failed)} failed, {len(s.baselines)} baselines. Device: {', '.join(devices)}.",
        ),
        (
            "p",
            "Method: each metric is the mean over seeds with its 95% interval (Student's t, n - 1 degrees of freedom), "
            "written mean [low, high]. A difference is 'larger than noise' when the 95% interval of the difference "
            "of means (Welch, unequal variances) excludes zero, i.e. Welch's t-test at the 5% level; otherwise "
            "'within noise'. 'Within noise' is not 'equal': it rules out only differences larger than its "
            "interval, and with 2 seeds (t = 12.7) those intervals are wide. One seed, or seeds that all measured "
            "the same value, give no noise estimate: 'cannot tell'. Differences are relative to the reference "
            "configuration (exact match: in percentage points). Only seed-to-seed noise is counted, not the "
            "sampling noise of the evaluation examples.",
        ),
    ]
    if sweeps or report.notes:
        blocks += [("h2", "Runs and notes"), ("ul", sweeps + report.notes)]
    header, rows = configuration_rows(report)
    blocks += [
        ("h2", "Every configuration"),
        (
            "p",
            "mean [95% interval] over seeds, best perplexity first; a single number: every seed measured the same; "
            "the base model alone (evaluated once) at the bottom.",
        ),
        ("table", header, rows),
        ("h2", "Findings"),
    ]
    number = {c.key: i for i, c in enumerate(report.configurations, 1)}
    fronts = [
        f"Pareto front of {METRICS[m].label} against peak memory (means): "
        + " -> ".join(f"#{number[c.key]} {c.label} ({c.mean(PEAK_MB):,.0f} MB, {cell(c.stats[m], m)})" for c in front)
        for m, front in report.fronts.items()
    ]
    blocks.append(("ul", fronts + report.baseline_lines))
    for comp in report.comparisons:
        found = [f.text for f in report.findings if f.comparison == comp.name]
        blocks += [
            ("h3", f"{comp.name} ({comp.fixed or 'all else equal'}; reference {comp.value(comp.reference)})"),
            ("table", *comparison_rows(comp)),
            ("ul", found + same_modules(comp)),
        ]
    blocks += [
        ("h2", "Recommendations by memory budget"),
        (
            "p",
            "The lowest mean perplexity among the configurations whose every seed peaked under the budget, and the "
            "ones that fit and are within noise of it.",
        ),
        ("ul", recommendation_lines(report.recommendations)),
        ("h2", "Published anchors"),
        (
            "p",
            "Each published result (summarised, not quoted) is tested on this study's runs; agrees / disagrees / "
            "cannot tell is decided by the numbers, per quality metric.",
        ),
        (
            "table",
            ["source", "published", "tested here as", "verdict", "perplexity", "exact match"],
            [
                [a.source, a.claim, a.test, a.verdict]
                + [f"{a.verdicts[m]}: {a.evidence[m]}" for m in (PERPLEXITY, EXACT_MATCH)]
                for a in report.anchors
            ],
        ),
        ("h2", "Charts"),
    ]
    blocks += [("img", path, CHART_TITLES[name]) for name, path in charts.items()]
    if report.scope.failed:
        failed = [
            f"{r.tags.get('sweep_configuration', r.name)} ({r.run_id[:8]}): "
            + r.tags.get("error", "no error recorded")[:300]
            for r in report.scope.failed
        ]
        blocks += [("h2", "Failed runs"), ("ul", failed)]
    return blocks


def same_modules(comp: Comparison) -> list[str]:
    """Presets that resolve to the same modules on this model train the same adapter under two names."""
    if comp.name != "modules":
        return []
    by_modules: dict[str, list[Configuration]] = defaultdict(list)
    for c in comp.configurations:
        by_modules[c.runs[0].params.get("target_modules_resolved", c.key)].append(c)
    return [
        f"{' and '.join(comp.value(c) for c in group)} adapt the same modules on this model ({modules}): one "
        "configuration under two names, measured twice"
        for modules, group in by_modules.items()
        if len(group) > 1
    ]


def recommendation_lines(recommendations: list[Recommendation]) -> list[str]:
    """One line per run of budgets with the same best configuration."""
    lines, i = [], 0
    while i < len(recommendations):
        j = i
        while j + 1 < len(recommendations) and recommendations[j + 1].best is recommendations[i].best:
            j += 1
        first, last = recommendations[i], recommendations[j]
        budgets = f"{first.budget_mb:,.0f} MB" + (f" to {last.budget_mb:,.0f} MB" if j > i else "")
        best = first.best
        if best is None:
            lines.append(f"{budgets}: no measured configuration fits")
        else:
            fits = f"{first.fitting}" + (f" to {last.fitting}" if last.fitting != first.fitting else "")
            close = ", ".join(c.label for c in last.within_noise)
            at = f" at {last.budget_mb:,.0f} MB" if j > i else ""
            em = best.stats.get(EXACT_MATCH)
            em_text = f"exact match {cell(em, EXACT_MATCH)}%" if em else "exact match not measured"
            lines.append(
                f"{budgets}: {best.label} (perplexity {cell(best.stats[PERPLEXITY], PERPLEXITY)}, {em_text}, "
                f"peak {best.worst_peak_mb:,.0f} MB); {fits} "
                "configurations fit"
                + (f"; within noise of it{at}: {close}" if close else f"; no other that fits{at} is within noise of it")
            )
        i = j + 1
    return lines


def render_markdown(blocks: list[tuple], folder: Path) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in rest[0]))
        elif kind == "table":
            header, rows = rest
            lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0].relative_to(folder).as_posix()})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[tuple], title: str) -> str:
    """One file with every image inside it (base64 PNG): it opens anywhere, as an MLflow artifact too."""
    e = html.escape
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{e(rest[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in rest[0]) + "</ul>")
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{e(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(rest[0].read_bytes()).decode()
            out.append(f'<figure><img alt="{e(rest[1])}" src="data:image/png;base64,{data}"></figure>')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}li{margin:.3em 0}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )


def write_csv(report: Report, path: Path) -> None:
    """configurations.csv: every configuration's n, mean, std, low, high of every metric, for other tools."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        metrics = list(METRICS)
        writer.writerow(
            ["configuration", "config_hash", "seeds"]
            + [f"{m}:{k}" for m in metrics for k in ("n", "mean", "std", "low", "high")]
        )
        for c in report.configurations:
            row = [c.label, c.key, " ".join(map(str, c.seeds))]
            for m in metrics:
                st = c.stats.get(m)
                row += ["", "", "", "", ""] if st is None else [st.n, st.mean, st.std, st.low, st.high]
            writer.writerow(["" if v is None else v for v in row])


def write_report(report: Report, folder: Path) -> dict[str, Path]:
    """report.md, report.html, configurations.csv and charts/*.png in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(report, folder / "charts")
    blocks = _document(report, charts)
    title = f"LoRA efficiency report: {report.scope.experiment}"
    paths = {"markdown": folder / "report.md", "html": folder / "report.html", "csv": folder / "configurations.csv"}
    paths["markdown"].write_text(render_markdown(blocks, folder), encoding="utf-8")
    paths["html"].write_text(render_html(blocks, title), encoding="utf-8")
    write_csv(report, paths["csv"])
    return {**paths, **charts}


# --------------------------------------------------------------------------------------------------------------
# Charts

CHART_TITLES = {
    "rank": "Rank against quality and trainable parameters",
    "frontier": "Efficiency frontier: quality against peak memory",
    "modules": "Target modules: quality, trainable parameters, memory",
    "quantization": "Storage of the base: quality, memory, speed",
    "loss_curves": "Training loss curves",
    "speed_memory": "Training speed against peak memory",
    "memory_estimate": "Predicted against measured peak memory",
}
INTERVALS = "error bars: 95% interval of the mean over seeds"


def _figure(ncols: int, title: str, *, width: float = 5.0, height: float = 4.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained", dpi=110)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    import textwrap

    fig.suptitle(textwrap.fill(title, int(width * ncols * 10)), fontsize=12)  # ~10 characters of 12 pt an inch
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _yerr(stats: list[Stat | None], scale: float = 1.0) -> list[float]:
    return [0.0 if st is None or st.half_width is None else st.half_width * scale for st in stats]


def _scale(metric: str) -> float:
    """Fractions in %, parameter counts in millions."""
    return 100.0 if METRICS[metric].fraction else 1e-6 if metric == "params/trainable" else 1.0


def _ylabel(metric: str) -> str:
    return "trainable parameters (millions)" if metric == "params/trainable" else METRICS[metric].axis


def _panel_title(metric: str) -> str:
    if metric == "params/trainable":
        return "trainable parameters"
    better = "higher" if METRICS[metric].higher_is_better else "lower"
    return f"{METRICS[metric].label} ({better} is better)"


def _not_measured(ax, metric: str) -> None:
    ax.text(0.5, 0.5, f"{METRICS[metric].label}\nnot measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def draw_charts(report: Report, folder: Path) -> dict[str, Path]:
    comps = {c.name: c for c in report.comparisons}
    number = {c.key: i for i, c in enumerate(report.configurations, 1)}  # the # of the configuration table
    charts = {}
    # a quality metric no run measured (exact match in the quick profile) gets no panel, only the report's note
    quality = tuple(m for m in QUALITY if any(m in c.stats for c in report.configurations)) or (PERPLEXITY,)
    if "rank" in comps:
        charts["rank"] = _save(chart_rank(comps["rank"], quality), folder / "1_rank.png")
    charts["frontier"] = _save(chart_frontier(report.configurations, report.fronts, number), folder / "2_frontier.png")
    if "modules" in comps:
        metrics = (*quality, "params/trainable", PEAK_MB)
        charts["modules"] = _save(
            chart_bars(comps["modules"], metrics, CHART_TITLES["modules"]), folder / "3_modules.png"
        )
    if "quantization" in comps:
        metrics = (*quality, PEAK_MB, "perf/train_tokens_per_second")
        chart = chart_bars(comps["quantization"], metrics, CHART_TITLES["quantization"])
        charts["quantization"] = _save(chart, folder / "4_quantization.png")
    if report.loss_curves:
        charts["loss_curves"] = _save(chart_loss_curves(report), folder / "5_loss_curves.png")
    charts["speed_memory"] = _save(chart_speed_memory(report.configurations, number), folder / "6_speed_memory.png")
    if report.memory_points:
        charts["memory_estimate"] = _save(chart_memory_estimate(report.memory_points), folder / "7_memory_estimate.png")
    return charts


def chart_rank(comp: Comparison, quality: tuple[str, ...] = QUALITY):
    """Quality with intervals and trainable parameters against the rank."""
    fig, axes = _figure(len(quality) + 1, f"{CHART_TITLES['rank']} ({comp.fixed}); {INTERVALS}")
    ranks = [int(c.settings["rank"]) for c in comp.configurations]
    for ax, metric in zip(axes, (*quality, "params/trainable"), strict=True):
        pairs = [(r, c.stats[metric]) for r, c in zip(ranks, comp.configurations, strict=True) if metric in c.stats]
        if not pairs:
            _not_measured(ax, metric)
            continue
        k = _scale(metric)
        xs, stats = [r for r, _ in pairs], [st for _, st in pairs]
        ax.errorbar(xs, [st.mean * k for st in stats], yerr=_yerr(stats, k), marker="o", capsize=4, label="mean")
        if metric != "params/trainable":
            seeds = [(r, v * k) for r, st in pairs for v in st.values]
            ax.scatter(*zip(*seeds, strict=True), s=14, color="grey", alpha=0.7, label="one seed", zorder=3)
            ax.legend(fontsize=8)
        if METRICS[metric].fraction:
            ax.set_ylim(bottom=0, top=max(5.0, ax.get_ylim()[1]))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel(_ylabel(metric))
        ax.set_title(_panel_title(metric), fontsize=10)
    return fig


def _numbered(ax, configs: list[Configuration], xs: list[float], ys: list[float], number: dict[str, int]) -> None:
    """Each point carries its configuration's # (the table's), placed round it in turn so neighbours overlap less;
    the key is the figure's legend."""
    offsets = [(4, 3), (4, -10), (-12, 3), (-12, -10)]
    order = sorted(range(len(configs)), key=lambda i: (xs[i], ys[i]))
    for turn, i in enumerate(order):
        ax.annotate(
            str(number[configs[i].key]),
            (xs[i], ys[i]),
            xytext=offsets[turn % 4],
            textcoords="offset points",
            fontsize=8,
        )


def _key(fig, configs: list[Configuration], number: dict[str, int]) -> None:
    from matplotlib.lines import Line2D

    shown = sorted(configs, key=lambda c: number[c.key])
    handles = [Line2D([], [], linestyle="none") for _ in shown]
    labels = [f"{number[c.key]}: {c.label}" for c in shown]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(shown)), fontsize=8, handlelength=0)


def chart_frontier(configs: list[Configuration], fronts: dict[str, list[Configuration]], number: dict[str, int]):
    """Quality against peak memory for every configuration, the Pareto front marked and joined."""
    metrics = [m for m in QUALITY if m in fronts] or [PERPLEXITY]
    fig, axes = _figure(len(metrics), f"{CHART_TITLES['frontier']}; {INTERVALS}", width=6.0, height=5.2)
    usable_all = []
    for ax, metric in zip(axes, metrics, strict=True):
        usable = [c for c in configs if metric in c.stats and PEAK_MB in c.stats]
        usable_all += [c for c in usable if c not in usable_all]
        k, front = _scale(metric), fronts.get(metric, [])
        for on, color, name in ((False, "tab:blue", "configuration"), (True, "tab:red", "Pareto front")):
            group = [c for c in usable if (c in front) == on]
            if group:
                ax.errorbar(
                    [c.mean(PEAK_MB) for c in group],
                    [c.mean(metric) * k for c in group],
                    yerr=_yerr([c.stats[metric] for c in group], k),
                    fmt="o",
                    color=color,
                    ecolor=color,
                    elinewidth=1,
                    alpha=0.8,
                    capsize=3,
                    label=name,
                    zorder=3 if on else 2,
                )
        if len(front) > 1:
            xs, ys = [c.mean(PEAK_MB) for c in front], [c.mean(metric) * k for c in front]
            ax.step(xs, ys, where="post", color="tab:red", alpha=0.5)
        _numbered(ax, usable, [c.mean(PEAK_MB) for c in usable], [c.mean(metric) * k for c in usable], number)
        if METRICS[metric].fraction:
            ax.set_ylim(bottom=0, top=max(5.0, ax.get_ylim()[1]))
        ax.set_xlabel("peak memory (MB, mean over seeds; lower is better)")
        ax.set_ylabel(METRICS[metric].axis)
        ax.set_title(_panel_title(metric), fontsize=10)
        ax.legend(fontsize=8)
    _key(fig, usable_all, number)
    return fig


def chart_bars(comp: Comparison, metrics: tuple[str, ...], title: str):
    """One bar per configuration of a comparison and per metric, with its interval; the reference in orange."""
    fig, axes = _figure(
        len(metrics), f"{title} ({comp.fixed}); orange: the reference; {INTERVALS}", width=4.2, height=4.6
    )
    names = [comp.value(c) for c in comp.configurations]
    for ax, metric in zip(axes, metrics, strict=True):
        stats = [c.stats.get(metric) for c in comp.configurations]
        if all(st is None for st in stats):
            _not_measured(ax, metric)
            continue
        k = _scale(metric)
        heights = [st.mean * k if st else 0 for st in stats]
        errors = _yerr(stats, k)
        colors = ["tab:orange" if c is comp.reference else "tab:blue" for c in comp.configurations]
        ax.bar(range(len(names)), heights, yerr=errors, capsize=4, color=colors)
        for i, st in enumerate(stats):
            if st is None:
                ax.text(i, 0, "not\nmeasured", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(_ylabel(metric))
        ax.set_title(_panel_title(metric), fontsize=10)
        if metric == PERPLEXITY:  # differences of a few % matter: the axis does not start at zero
            lows = [h - e for h, e in zip(heights, errors, strict=True) if h]
            tops = [h + e for h, e in zip(heights, errors, strict=True) if h]
            pad = (max(tops) - min(lows)) * 0.15 or 0.1
            ax.set_ylim(min(lows) - pad, max(tops) + pad)
        elif METRICS[metric].fraction:
            ax.set_ylim(bottom=0, top=max(5.0, ax.get_ylim()[1]))
    return fig


def chart_loss_curves(report: Report):
    """train/loss per step, the mean over seeds, one panel per comparison (a configuration may be in several)."""
    from matplotlib.ticker import MaxNLocator

    panels = [(f"{c.name} ({c.fixed})", [(c.value(x), x) for x in c.configurations]) for c in report.comparisons]
    placed = {x.key for c in report.comparisons for x in c.configurations}
    others = [(x.label, x) for x in report.configurations if x.key not in placed]
    if others or not panels:
        everyone = [(x.label, x) for x in report.configurations]
        panels.append(("other configurations" if panels else "every configuration", others or everyone))
    title = f"{CHART_TITLES['loss_curves']}: mean over seeds, band from the lowest to the highest seed"
    fig, axes = _figure(len(panels), title, width=5.2)
    for ax, (panel_title, members) in zip(axes, panels, strict=True):
        for name, config in members:
            by_step: dict[int, list[float]] = defaultdict(list)
            for r in config.runs:
                for step, value in report.loss_curves.get(r.run_id, []):
                    by_step[step].append(value)
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            (line,) = ax.plot(steps, mean, label=name, linewidth=1.4)
            low, high = [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps]
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.08)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss (nats per target token)")
        ax.legend(fontsize=8)
    return fig


def chart_speed_memory(configs: list[Configuration], number: dict[str, int]):
    speed = "perf/train_tokens_per_second"
    usable = [c for c in configs if PEAK_MB in c.stats and speed in c.stats]
    fig, axes = _figure(1, f"{CHART_TITLES['speed_memory']}; {INTERVALS}", width=7.5, height=5.5)
    ax = axes[0]
    xs, ys = [c.mean(PEAK_MB) for c in usable], [c.mean(speed) for c in usable]
    ax.errorbar(
        xs,
        ys,
        xerr=_yerr([c.stats[PEAK_MB] for c in usable]),
        yerr=_yerr([c.stats[speed] for c in usable]),
        fmt="o",
        elinewidth=1,
        alpha=0.6,
        capsize=3,
    )
    _numbered(ax, usable, xs, ys, number)
    ax.set_xlabel("peak memory (MB, lower is better)")
    ax.set_ylabel("training speed (tokens/s, steady state; higher is better)")
    _key(fig, usable, number)
    return fig


def chart_memory_estimate(points: list[MemoryPoint]):
    fig, axes = _figure(1, f"{CHART_TITLES['memory_estimate']}, one point per run", width=7.5, height=6)
    ax = axes[0]
    for storage in sorted({p.quantization for p in points}):
        group = [p for p in points if p.quantization == storage]
        ax.scatter([p.predicted_mb for p in group], [p.measured_mb for p in group], label=storage, s=25, zorder=3)
    values = [v for p in points for v in (p.predicted_mb, p.measured_mb)]
    lo, hi = min(values) * 0.85, max(values) * 1.15
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="measured = predicted")
    ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="grey", alpha=0.15, label="±15%")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    errors = sorted(p.measured_mb / p.predicted_mb - 1 for p in points)
    logged = sum(p.logged for p in points)
    if logged == len(points):
        source = "the planner's figure each run logged (memory/predicted_peak_mb)"
    else:
        source = (
            f"{logged} runs' own memory/predicted_peak_mb; {len(points) - logged} estimated here from their params\n"
            "with every position a loss target (the planner's upper bound: those runs predate the metric)"
        )
    ax.set_title(
        f"measured / predicted - 1: median {errors[len(errors) // 2]:+.1%}, from {errors[0]:+.1%} to "
        f"{errors[-1]:+.1%}\n{source}",
        fontsize=9,
    )
    ax.set_xlabel("predicted peak memory (MB)")
    ax.set_ylabel("measured peak memory, memory/peak_mb (MB)")
    ax.legend(fontsize=8, title="base storage")
    return fig
