"""What the report finds in its runs: configurations (the runs of one config_hash, aggregated over seeds), the
comparisons along each axis and their findings against the noise, the adapters against the base model alone,
the published anchors tested, the Pareto fronts and the recommendations by memory budget, gathered in a Report.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from lora_efficiency.config import parse_bool
from lora_efficiency.configuration import REPORT_SETTINGS
from lora_efficiency.report.metrics import EXACT_MATCH, FINDING_METRICS, METRICS, PEAK_MB, PERPLEXITY, QUALITY
from lora_efficiency.report.runs import MemoryPoint, RunData, Scope
from lora_efficiency.report.stats import Difference, Stat, cell, difference, pareto_front

FOUR_BIT = ("nf4", "fp4")


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
    """One Configuration per config_hash; labels name only the settings that vary in this set of runs.

    Args:
        runs: FINISHED training runs, any number of seeds each.

    Returns:
        The configurations, lowest mean perplexity first (unmeasured last), then by label.
    """
    groups: dict[str, list[RunData]] = defaultdict(list)
    for r in runs:
        groups[r.config_hash].append(r)
    settings = {k: rs[0].settings for k, rs in groups.items()}
    varying = _varying(settings.values())
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


def _varying(settings: Iterable[dict[str, str]]) -> list[str]:
    """The settings (configuration.REPORT_SETTINGS) that take more than one value over these configurations."""
    settings = list(settings)
    return [p for p in REPORT_SETTINGS if len({s[p] for s in settings}) > 1]


def _label_parts(s: dict[str, str], varying: list[str]) -> dict[str, str]:
    """Rank, modules and storage always (the study's axes, as in run names: r16 attention nf4), then every other
    setting that varies as name=value."""
    parts = {"rank": f"r{s['rank']}", "target_modules": s["target_modules"], "quantization": s["quantization"]}
    if s["quantization"] in FOUR_BIT and parse_bool(s["double_quant"] or "true") is not True:
        parts["double_quant"] = "no-dq"
    for p in varying:
        if p not in ("rank", "target_modules", "quantization", "double_quant"):
            parts[p] = f"{p}={s[p]}"
    return parts


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
    that differ only along it.

    The reference is bf16 for quantization (the 16-bit base QLoRA is measured against), else the configuration
    with the train defaults' value (r16, attention), else the first.

    Args:
        configs: the configurations of the report.
        defaults: the train defaults (configs/default.yaml), which break ties and pick references.

    Returns:
        One Comparison per axis along which at least two configurations differ only.
    """
    varying = _varying(c.settings for c in configs)
    axes = dict(AXES)
    for p in varying:
        if not any(p in a for a in axes.values()):
            axes[p] = (p,)
    comparisons = []
    for name, axis in axes.items():
        groups: dict[tuple, list[Configuration]] = defaultdict(list)
        for c in configs:
            groups[tuple(v for p, v in c.settings.items() if p not in axis)].append(c)
        best = max(groups.values(), key=lambda g: (len(g), _count_matching_defaults(g, defaults, axis)))
        if len(best) < 2:
            continue
        ordered = sorted(best, key=lambda c: _axis_order(name, c))
        reference = next((c for c in ordered if name == "quantization" and c.settings["quantization"] == "bf16"), None)
        reference = reference or next(
            (c for c in ordered if all(c.settings[p] == str(defaults.get(p)) for p in axis)), ordered[0]
        )
        comparisons.append(Comparison(name, axis, ordered, reference, varying))
    return comparisons


def _count_matching_defaults(group: list[Configuration], defaults: dict[str, object], axis: tuple[str, ...]) -> int:
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
        return (storage, parse_bool(s["double_quant"]) is not True)
    value = s[name]
    return (0, float(value), "") if re.fullmatch(r"[-+0-9.e]+", value) else (1, 0.0, value)


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


def baseline_findings(configs: list[Configuration], baselines: list[RunData]) -> list[str]:
    """The adapters of each storage against the base model alone in that storage (a constant: one deterministic
    evaluation)."""
    lines = []
    for base in sorted(baselines, key=lambda r: r.tags.get("quantization", "")):
        storage = base.storage
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
    """Each published result of ANCHOR_CLAIMS tested on the comparisons, per quality metric."""
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
    verdict_of = {"rank": _rank_verdict, "modules": _modules_verdict}.get(name, _quantization_verdict)
    return verdict_of(comp, measured, metric)


def _rank_verdict(comp: Comparison, measured: list[Configuration], metric: str) -> tuple[str, str]:
    """Every rank within noise of the best one: agrees; any rank worse beyond noise: disagrees."""
    if comp.reference.settings["target_modules"] not in ("attention", "attention_mlp", "all_linear"):
        return "cannot tell", "the ranks were not swept on all attention matrices"
    sign = 1 if METRICS[metric].higher_is_better else -1
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


def _modules_verdict(comp: Comparison, measured: list[Configuration], metric: str) -> tuple[str, str]:
    """The widest module set beats every strict subset beyond noise: agrees; a subset not beaten: disagrees."""
    modules = {c.key: set(c.runs[0].params.get("target_modules_resolved", "").split(",")) for c in measured}
    widest = max(measured, key=lambda c: len(modules[c.key]))
    subsets = [c for c in measured if modules[c.key] < modules[widest.key]]
    if not subsets:
        return "cannot tell", "no configuration adapts a strict subset of the widest one's modules"
    diffs = [(c, difference(widest.stats[metric], c.stats[metric], metric=metric)) for c in subsets]
    beaten = [(c, d) for c, d in diffs if d.verdict == "larger than noise" and _better(d) > 0]
    matched = [
        (c, d) for c, d in diffs if d.verdict == "within noise" or (d.verdict == "larger than noise" and _better(d) < 0)
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
            f"{comp.value(widest)} beats all {len(diffs)} subsets beyond noise; closest {comp.value(c)}: {d.text()}",
        )
    return "cannot tell", "the seeds agree exactly, no noise estimate"


def _quantization_verdict(comp: Comparison, measured: list[Configuration], metric: str) -> tuple[str, str]:
    """nf4 (with double quantization if measured) not worse than bf16 beyond a measured noise: agrees."""
    nf4s = [c for c in measured if c.settings["quantization"] == "nf4"]
    nf4 = next((c for c in nf4s if parse_bool(c.settings["double_quant"]) is True), None)
    nf4 = nf4 or next(iter(nf4s), None)
    bf16 = next((c for c in measured if c.settings["quantization"] == "bf16"), None)
    if nf4 is None or bf16 is None:
        return "cannot tell", "nf4 or bf16 not measured"
    d = difference(nf4.stats[metric], bf16.stats[metric], metric=metric)
    evidence = f"{comp.value(nf4)} vs bf16: {d.text()}"
    if not _measured_noise(d):
        return "cannot tell", evidence
    return ("disagrees" if d.verdict == "larger than noise" and _better(d) < 0 else "agrees"), evidence


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


def recommendation_lines(recommendations: list[Recommendation]) -> list[str]:
    """One line per run of budgets with the same best configuration."""
    lines, i = [], 0
    while i < len(recommendations):
        j = i
        while j + 1 < len(recommendations) and recommendations[j + 1].best is recommendations[i].best:
            j += 1
        lines.append(_recommendation_line(recommendations[i : j + 1]))
        i = j + 1
    return lines


def _recommendation_line(same_best: list[Recommendation]) -> str:
    """Successive budgets with the same best configuration (or none), as one line."""
    first, last = same_best[0], same_best[-1]
    several = len(same_best) > 1
    budgets = f"{first.budget_mb:,.0f} MB" + (f" to {last.budget_mb:,.0f} MB" if several else "")
    best = first.best
    if best is None:
        return f"{budgets}: no measured configuration fits"
    fits = f"{first.fitting}" + (f" to {last.fitting}" if last.fitting != first.fitting else "")
    close = ", ".join(c.label for c in last.within_noise)
    at = f" at {last.budget_mb:,.0f} MB" if several else ""
    em = best.stats.get(EXACT_MATCH)
    em_text = f"exact match {cell(em, EXACT_MATCH)}%" if em else "exact match not measured"
    return (
        f"{budgets}: {best.label} (perplexity {cell(best.stats[PERPLEXITY], PERPLEXITY)}, {em_text}, "
        f"peak {best.worst_peak_mb:,.0f} MB); {fits} "
        "configurations fit"
        + (f"; within noise of it{at}: {close}" if close else f"; no other that fits{at} is within noise of it")
    )


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
    """Aggregate, compare and decide.

    Args:
        scope: the runs to report (fetch_scope).
        defaults: the train defaults, which pick each comparison's reference configuration.
        budgets_mb: the memory budgets to recommend for; None: a round ladder over the measured peaks.
        loss_curves: train/loss per step of each run id (fetch_loss_curves), for the loss chart.
        memory_points: predicted against measured peak memory (predict_peak_memory), for the memory chart.
        memory_notes: the runs predict_peak_memory left out, and why.

    Returns:
        Everything the report writes, as data.
    """
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
