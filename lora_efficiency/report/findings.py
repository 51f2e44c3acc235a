"""What the report finds in its runs: configurations (the runs of one config_hash, aggregated over seeds), the
comparisons along each axis and against full fine-tuning, their findings judged against the noise and the declared
margin, the adapters against the base model alone, the published anchors tested, the Pareto fronts and the
recommendations by memory budget, gathered in a Report.

Every verdict the report states is one test of its Family (report/stats.py): the tests are planned first
(plan_tests), corrected together with Holm, then read back by the findings, anchors, baselines and
recommendations.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from lora_efficiency.config import parse_bool
from lora_efficiency.configuration import REPORT_SETTINGS
from lora_efficiency.design import EQUIVALENCE, Contrast, pick
from lora_efficiency.names import QUANTIZATIONS
from lora_efficiency.report.metrics import EXACT_MATCH, FINDING_METRICS, METRICS, PEAK_MB, PERPLEXITY, QUALITY
from lora_efficiency.report.runs import MemoryPoint, RunData, Scope
from lora_efficiency.report.stats import (
    WORSE,
    Effect,
    Family,
    Judgement,
    Stat,
    cell,
    effect,
    example_noise,
    margin_text,
    pareto_front,
    with_example_noise,
)

FOUR_BIT = ("nf4", "fp4")
# Settings of LoRA alone: a full fine-tuning configuration is labelled without them.
LORA_SETTINGS = ("rank", "alpha", "dropout", "target_modules", "double_quant", "use_rslora", "use_dora")
# What a LoRA configuration must share with full fine-tuning to be compared with it: the base, the data and the
# training budget (the learning rate may differ: each method is tuned at its own).
SAME_SETUP = ("base_model", "data_fingerprint", "max_steps", "batch_size", "grad_accum", "seq_len", "packing")


@dataclass
class Configuration:
    """The runs of one config_hash (one per seed) and their statistics."""

    key: str
    label: str
    settings: dict[str, str]
    runs: list[RunData]
    stats: dict[str, Stat]  # only metrics that at least one seed measured
    # per-example losses by seed (per_example_losses.json); None: not read for this report (seed noise only)
    losses: dict[int, dict[str, list]] | None = None

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def full_ft(self) -> bool:
        return self.settings.get("method") == "full"

    def mean(self, metric: str) -> float | None:
        return self.stats[metric].mean if metric in self.stats else None

    def by_seed(self, metric: str) -> dict[int, float]:
        """The metric of each seed that measured it: what paired comparisons pair."""
        return {r.seed: r.metrics[metric] for r in self.runs if metric in r.metrics}

    @property
    def worst_peak_mb(self) -> float | None:
        """The largest peak over seeds: what a budget must hold for every seed to fit."""
        return max(self.stats[PEAK_MB].values) if PEAK_MB in self.stats else None


def _settings(run: RunData) -> dict[str, str]:
    """A run's configuration settings; a run without a `method` param (from before that setting) is LoRA."""
    return {**run.settings, "method": run.settings.get("method") or "lora"}


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
    settings = {k: _settings(rs[0]) for k, rs in groups.items()}
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
    return [p for p in REPORT_SETTINGS if len({s.get(p, "") for s in settings}) > 1]


def _label_parts(s: dict[str, str], varying: list[str]) -> dict[str, str]:
    """Rank, modules and storage always (the study's axes, as in run names: r16 attention nf4), then every other
    setting that varies as name=value. Full fine-tuning is "full FT" (its storage only when not bf16), then the
    varying settings that are not LoRA's."""
    if s.get("method") == "full":
        parts = {"method": "full FT"} | ({"quantization": s["quantization"]} if s["quantization"] != "bf16" else {})
        skip = ("method", "quantization", *LORA_SETTINGS)
    else:
        parts = {"rank": f"r{s['rank']}", "target_modules": s["target_modules"], "quantization": s["quantization"]}
        if s["quantization"] in FOUR_BIT and parse_bool(s["double_quant"] or "true") is not True:
            parts["double_quant"] = "no-dq"
        skip = ("method", "rank", "target_modules", "quantization", "double_quant")
    for p in varying:
        if p not in skip:
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
    held: str | None = None  # what the comparison holds fixed, where that is not "every setting off the axis"

    def value(self, c: Configuration) -> str:
        """The configuration's position on the axis: r32, q_v, nf4 no-dq."""
        parts = _label_parts(c.settings, self.varying)
        return " ".join(v for p, v in parts.items() if p in self.axis) or c.label

    @property
    def fixed(self) -> str:
        """What the comparison holds fixed: attention nf4."""
        if self.held is not None:
            return self.held
        parts = _label_parts(self.reference.settings, self.varying)
        return " ".join(v for p, v in parts.items() if p not in self.axis)


AXES = {"rank": ("rank",), "modules": ("target_modules",), "quantization": ("quantization", "double_quant")}
FULL_FT = "full FT"  # the comparison of LoRA configurations with full fine-tuning


def find_comparisons(configs: list[Configuration], *, defaults: dict[str, object]) -> list[Comparison]:
    """For rank, modules, quantization and any other setting that varies: the largest set of LoRA configurations
    that differ only along it; and, when a full fine-tuning configuration is present, the LoRA configurations of
    its setup against it.

    The reference is bf16 for quantization (the 16-bit base QLoRA is measured against), else the configuration
    with the train defaults' value (r16, attention), else the first; full FT is the reference of its comparison.

    Args:
        configs: the configurations of the report.
        defaults: the train defaults (configs/default.yaml), which break ties and pick references.

    Returns:
        One Comparison per axis along which at least two configurations differ only, then the full FT one.
    """
    varying = _varying(c.settings for c in configs)
    axes = dict(AXES)
    for p in varying:
        if p != "method" and not any(p in a for a in axes.values()):
            axes[p] = (p,)
    lora = [c for c in configs if not c.full_ft]
    comparisons = []
    for name, axis in axes.items():
        groups: dict[tuple, list[Configuration]] = defaultdict(list)
        for c in lora:
            groups[tuple(v for p, v in c.settings.items() if p not in axis)].append(c)
        best = max(groups.values(), key=lambda g: (len(g), _count_matching_defaults(g, defaults, axis)), default=[])
        if len(best) < 2:
            continue
        ordered = sorted(best, key=lambda c: _axis_order(name, c))
        reference = next((c for c in ordered if name == "quantization" and c.settings["quantization"] == "bf16"), None)
        reference = reference or next(
            (c for c in ordered if all(c.settings[p] == str(defaults.get(p)) for p in axis)), ordered[0]
        )
        comparisons.append(Comparison(name, axis, ordered, reference, varying))
    full = _full_ft_comparison(configs, varying)
    return comparisons + ([full] if full else [])


def _full_ft_comparison(configs: list[Configuration], varying: list[str]) -> Comparison | None:
    """The best full fine-tuning configuration (lowest mean perplexity) as the reference of every LoRA
    configuration trained on the same base and data for the same steps and batches."""
    full = next((c for c in configs if c.full_ft), None)
    if full is None:
        return None
    same = [c for c in configs if not c.full_ft and all(c.settings.get(p) == full.settings.get(p) for p in SAME_SETUP)]
    if not same:
        return None
    held = "same base, data, steps and batches; each at its own learning rate"
    return Comparison(FULL_FT, tuple(REPORT_SETTINGS), [*same, full], full, varying, held)


def _count_matching_defaults(group: list[Configuration], defaults: dict[str, object], axis: tuple[str, ...]) -> int:
    """How many fixed settings of a group are the train defaults: breaks ties towards the study's base."""
    s = group[0].settings
    return sum(s[p] == str(defaults[p]) for p in s if p in defaults and p not in axis)


def _axis_order(name: str, c: Configuration) -> tuple:
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


# The tests of a report: (a, b, metric) with a and b Configurations, or b the base model alone (a baseline run).
Compared = Configuration | RunData


def _test_key(a: Compared, b: Compared, metric: str) -> tuple[str, str, str]:
    def key(x: Compared) -> str:
        return x.key if isinstance(x, Configuration) else f"baseline:{x.run_id}"

    return key(a), key(b), metric


def paired_effect(
    a: Configuration, b: Configuration, metric: str, delta: float | None, task: str | None = None
) -> Effect:
    """a - b paired by seed; for perplexity with per-example losses on every pair, both noises (seeds by t,
    examples by bootstrap: stats.example_noise), else the seeds' alone, saying why. `task`: one task family's
    eval loss (eval/loss/<family>) and examples."""
    by_a, by_b = a.by_seed(metric), b.by_seed(metric)
    eff = effect(by_a, by_b, metric=metric, delta=delta)
    if metric != PERPLEXITY or a.losses is None or b.losses is None:
        return eff
    common = sorted(set(by_a) & set(by_b))
    if len(common) < 2:
        return eff
    missing = sum(s not in a.losses or s not in b.losses for s in common)
    if missing:
        return replace(eff, noise=f"seeds only: {missing} of {len(common)} pairs have no per-example losses")
    noise = example_noise([(a.losses[s], b.losses[s]) for s in common], task=task)
    if noise is None:
        return replace(eff, noise="seeds only: fewer than 2 examples scored in every run")
    ds = [math.log(by_a[s]) - math.log(by_b[s]) for s in common]
    return with_example_noise(ds, *noise, metric=metric, delta=delta)


def add_test(family: Family, a: Configuration, b: Compared, metric: str) -> None:
    """a against b on one metric, paired by seed (against a baseline: its one evaluation, a constant); perplexity
    also gets the equivalence test against the family's margin, except against the base alone: an adapter is never
    meant to be equivalent to its untrained base, and a TOST there would only double the Holm multiplier of the
    declared equivalence tests. a vs b and b vs a are one test."""
    if isinstance(b, Configuration) and b.key < a.key:
        a, b = b, a
    delta = math.log(family.margin) if metric == PERPLEXITY and isinstance(b, Configuration) else None
    if isinstance(b, Configuration):
        family.add(_test_key(a, b, metric), paired_effect(a, b, metric, delta))
        return
    other = float(b.metrics[metric]) if metric in b.metrics else {}
    family.add(_test_key(a, b, metric), effect(a.by_seed(metric), other, metric=metric, delta=delta))


def judged(family: Family, a: Configuration, b: Compared, metric: str) -> Judgement:
    """The judgement of a against b that plan_tests added (a test stored the other way round, reversed)."""
    if isinstance(b, Configuration) and b.key < a.key:
        return family[_test_key(b, a, metric)].reversed()
    return family[_test_key(a, b, metric)]


@dataclass(frozen=True)
class DeclaredContrast:
    """A contrast the study declared, and the configurations its sides name in these runs (None: not run)."""

    contrast: Contrast
    a: Configuration | None
    b: Configuration | None


def match_contrasts(
    contrasts: list[Contrast], configs: list[Configuration], defaults: dict[str, object]
) -> list[DeclaredContrast]:
    """Each declared contrast's sides as configurations: the listed settings, and of several that have them, the
    one with the most other settings at the defaults (the profile's)."""
    settings = [c.settings for c in configs]
    out = []
    for contrast in contrasts:
        ia, ib = (pick(side, settings, defaults) for side in (contrast.a, contrast.b))
        out.append(DeclaredContrast(contrast, None if ia is None else configs[ia], None if ib is None else configs[ib]))
    return out


def add_declared(family: Family, declared: DeclaredContrast) -> None:
    """A declared contrast's one test, in the declared family (before the other tests: the same pair compared
    elsewhere in the report is this test)."""
    a, b, c = declared.a, declared.b, declared.contrast
    if a is None or b is None or a is b:
        return
    if b.key < a.key:
        a, b = b, a
    eff = paired_effect(a, b, c.metric, math.log1p(c.margin) if c.test == "equivalence" else None)
    family.declare(_test_key(a, b, c.metric), eff, name=c.name, test=c.test, margin=1 + c.margin)


def declared_lines(declared: list[DeclaredContrast], family: Family) -> list[str]:
    """One line per declared contrast: its verdict (or why it has none), and how many seeds would decide it."""
    lines = []
    for d in declared:
        c = d.contrast
        head = f"{c.name} ({c.describe()} on {METRICS[c.metric].label}, declared before the data)"
        if d.a is None or d.b is None:
            missing = " and ".join(f"{side}={getattr(c, side)}" for side in ("a", "b") if getattr(d, side) is None)
            lines.append(f"{head}: not run ({missing} matches no configuration of these runs)")
        elif d.a is d.b:
            lines.append(f"{head}: a and b name the same configuration ({d.a.label}): nothing to test")
        else:
            lines.append(f"{head}: {d.a.label} vs {d.b.label}: {judged(family, d.a, d.b, c.metric).text()}")
    return lines


# A task family is at its ceiling where the better of the two configurations has a perplexity below 1.10 on it:
# under 0.095 nats per answer token are left, so a ratio there barely moves (the quick study of 2026-12-04 had json at
# 1.00 and date at 1.14), while its long answers still dominate the token-weighted overall perplexity.
CEILING = 1.10
FAMILY_PREFIX = "eval/perplexity/"


def _safe(task: str) -> str:
    """A task family as its metric names it (lora_efficiency.evaluation.family_metric)."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", task) or "untitled"


def _family_effect(
    d: DeclaredContrast, name: str, by_a: dict[int, float], by_b: dict[int, float], delta: float
) -> Effect:
    """One task family's paired effect of a declared contrast, equivalence tested within `delta` (ln of the ratio),
    with its examples' noise where every pair has per-example losses."""
    common = sorted(set(by_a) & set(by_b))
    la, lb = d.a.losses or {}, d.b.losses or {}
    if len(common) >= 2 and all(s in la and s in lb for s in common):
        tasks = {t for s in common for t in la[s].get("task") or [] if _safe(str(t)) == name}
        if len(tasks) == 1:
            noise = example_noise([(la[s], lb[s]) for s in common], task=tasks.pop())
            if noise is not None:
                ds = [math.log(by_a[s]) - math.log(by_b[s]) for s in common]
                return with_example_noise(ds, *noise, metric=PERPLEXITY, delta=delta)
    return effect(by_a, by_b, metric=PERPLEXITY, delta=delta)


def family_lines(declared: list[DeclaredContrast], alpha: float, margin: float = 1.02) -> list[str]:
    """Each declared perplexity contrast on each task family not at its ceiling (CEILING), in a Holm family of
    their own: exploratory, since which families are tested is read from these runs' perplexities. Equivalence is
    tested within an equivalence contrast's own margin; a difference contrast's margin is the effect its seeds
    were sized for, not a margin anyone declared for equivalence, so its families use the report's (`margin`)."""
    family, planned, ceiling = Family(alpha=alpha, margin=margin), [], []  # each test carries its own margin
    for d in declared:
        if d.a is None or d.b is None or d.a is d.b or d.contrast.metric != PERPLEXITY:
            continue
        delta = d.contrast.delta if d.contrast.test == EQUIVALENCE else math.log(margin)
        names = sorted(
            {m[len(FAMILY_PREFIX) :] for r in d.a.runs + d.b.runs for m in r.metrics if m.startswith(FAMILY_PREFIX)}
        )
        for name in names:
            by_a, by_b = d.a.by_seed(FAMILY_PREFIX + name), d.b.by_seed(FAMILY_PREFIX + name)
            if not by_a or not by_b:
                continue
            best = min(sum(by_a.values()) / len(by_a), sum(by_b.values()) / len(by_b))
            if best < CEILING:
                ceiling.append(f"{d.contrast.name}, {name} ({best:.2f})")
                continue
            family.add((d.contrast.name, name), _family_effect(d, name, by_a, by_b, delta))
            planned.append((d.contrast.name, name))
    if not planned and not ceiling:
        return []
    family.close()
    lines = [f"{c} on task family {name}: {family[(c, name)].text()}" for c, name in planned]
    if ceiling:
        lines.append(f"at their ceiling (perplexity below {CEILING:.2f}), not tested: " + "; ".join(ceiling))
    return lines


@dataclass(frozen=True)
class Finding:
    comparison: str
    a: str  # labels along the comparison's axis
    b: str
    judgements: dict[str, Judgement]
    text: str


def compare(comparison: Comparison, family: Family) -> list[Finding]:
    """Every configuration of a comparison against its reference, on quality and cost."""
    ref = comparison.reference
    findings = []
    for c in comparison.configurations:
        if c is ref:
            continue
        judgements = {m: judged(family, c, ref, m) for m in FINDING_METRICS}
        parts = [judgements[m].text() for m in FINDING_METRICS]
        if comparison.name in ("rank", "modules") and "params/trainable" in c.stats and ref.mean("params/trainable"):
            parts.append(f"trainable parameters x{c.mean('params/trainable') / ref.mean('params/trainable'):.2f}")
        a, b = comparison.value(c), comparison.value(ref)
        findings.append(Finding(comparison.name, a, b, judgements, f"{a} vs {b}: " + "; ".join(parts) + "."))
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


def _baseline_members(configs: list[Configuration], base: RunData, metric: str) -> list[Configuration]:
    """The adapters trained on the baseline's storage that measured `metric`, if the baseline did."""
    if metric not in base.metrics:
        return []
    return [c for c in configs if c.settings["quantization"] == base.storage and metric in c.stats]


def baseline_findings(configs: list[Configuration], baselines: list[RunData], family: Family) -> list[str]:
    """The adapters of each storage against the base model alone in that storage (a constant: one deterministic
    evaluation, so these tests are unpaired)."""
    lines = []
    for base in sorted(baselines, key=lambda r: r.tags.get("quantization", "")):
        parts = []
        for metric in QUALITY:
            same = _baseline_members(configs, base, metric)
            if not same:
                continue
            spec, value = METRICS[metric], base.metrics[metric]
            verdicts = [judged(family, c, base, metric) for c in same]
            means = sorted(c.mean(metric) for c in same)
            low, high = spec.show(means[0]), spec.show(means[-1])
            span = low if low == high else f"{low} to {high}"
            unit = "%" if spec.fraction else ""
            better = sum(j.beyond_noise and j.improves for j in verdicts)
            parts.append(
                f"{spec.label} {spec.show(value)}{unit} without adapter, {span}{unit} with one; {better} of "
                f"{len(same)} better beyond noise (Holm; unpaired: the base is one evaluation, without seeds)"
            )
        if parts:
            lines.append(f"No adapter vs adapters on the {base.storage} base: " + "; ".join(parts) + ".")
    return lines


AGREES, DISAGREES, CANNOT_TELL = "agrees", "disagrees", "cannot tell"
NOT_COMPARABLE = "not comparable on this base"


@dataclass(frozen=True)
class AnchorCheck:
    source: str
    claim: str  # the published statement
    test: str  # how this study tests it
    setup: str  # what differs between the paper's setup and this study's
    verdicts: dict[str, str]  # quality metric -> agrees / disagrees / cannot tell / not comparable on this base
    evidence: dict[str, str]  # quality metric -> the numbers behind the verdict

    @property
    def verdict(self) -> str:
        decided = {v for v in self.verdicts.values() if v != CANNOT_TELL}
        return CANNOT_TELL if not decided else decided.pop() if len(decided) == 1 else "mixed"


# name -> (source, claim, how it is tested here, the paper's setup)
ANCHOR_CLAIMS = {
    "rank": (
        "LoRA paper (Hu et al. 2021), Table 6",
        "once all attention matrices are adapted, rank barely matters: r = 1 to 64 score about the same",
        "every rank at the same target modules (the attention matrices or more: the rank comparison of these "
        "runs) against the best rank: agrees when every one is equivalent within the margin, disagrees when one is "
        "worse beyond noise and by more than the margin",
        "GPT-3 175B on WikiSQL and MultiNLI, validation accuracy",
    ),
    "modules": (
        "QLoRA paper (Dettmers et al. 2023)",
        "LoRA on all linear layers is needed to match 16-bit fine-tuning; attention-only adapters fall short",
        "the configuration adapting the most linear layers against each one adapting a strict subset of them: "
        "agrees when it is better than every one beyond noise, disagrees when a subset is better beyond noise or "
        "equivalent to it",
        "LLaMA 7B on Alpaca, RougeL",
    ),
    "quantization": (
        "QLoRA paper (Dettmers et al. 2023)",
        "an NF4 base (with double quantization) matches a BF16 base",
        "nf4 against bf16 at the same rank and modules: agrees when equivalent within the margin, disagrees when "
        "nf4 is worse beyond noise and by more than the margin",
        "LLaMA 7B to 65B on Alpaca and FLAN v2, 5-shot MMLU",
    ),
}


def _anchor_pairs(name: str, comp: Comparison | None, metric: str) -> tuple[list[tuple[Configuration, ...]], str]:
    """The (a, b) tests behind one anchor on one quality metric, or none and why."""
    if comp is None:
        return [], f"no {name} comparison in these runs"
    measured = [c for c in comp.configurations if metric in c.stats]
    if len(measured) < 2:
        return [], f"{METRICS[metric].label} not measured"
    if name == "rank":
        named = comp.reference.settings["target_modules"].split(" (= ")[0]  # "all_linear (= attention_mlp)"
        if named not in ("attention", "attention_mlp", "all_linear"):
            return [], "the ranks were not swept on all attention matrices"
        sign = 1 if METRICS[metric].higher_is_better else -1
        best = max(measured, key=lambda c: sign * c.mean(metric))
        return [(c, best) for c in measured if c is not best], ""
    if name == "modules":
        modules = {c.key: set(c.runs[0].params.get("target_modules_resolved", "").split(",")) for c in measured}
        widest = max(measured, key=lambda c: len(modules[c.key]))
        subsets = [c for c in measured if modules[c.key] < modules[widest.key]]
        if not subsets:
            return [], "no configuration adapts a strict subset of the widest one's modules"
        return [(widest, c) for c in subsets], ""
    nf4s = [c for c in measured if c.settings["quantization"] == "nf4"]
    nf4 = next((c for c in nf4s if parse_bool(c.settings["double_quant"]) is True), None) or next(iter(nf4s), None)
    bf16 = next((c for c in measured if c.settings["quantization"] == "bf16"), None)
    if nf4 is None or bf16 is None:
        return [], "nf4 or bf16 not measured"
    return [(nf4, bf16)], ""


def check_anchors(comparisons: list[Comparison], family: Family) -> list[AnchorCheck]:
    """Each published result of ANCHOR_CLAIMS tested on the comparisons, per quality metric, from the family's
    judgements (plan_tests added them)."""
    by_name = {c.name: c for c in comparisons}
    checks = []
    for name, (source, claim, test, theirs) in ANCHOR_CLAIMS.items():
        verdicts, evidence = {}, {}
        for metric in QUALITY:
            verdicts[metric], evidence[metric] = _anchor_verdict(name, by_name.get(name), metric, family)
        checks.append(
            AnchorCheck(source, claim, test, f"theirs: {theirs}; {_our_setup(by_name.get(name))}", verdicts, evidence)
        )
    return checks


def _our_setup(comp: Comparison | None) -> str:
    if comp is None:
        return "ours: not run"
    p = comp.reference.runs[0].params
    model = p.get("base_model") or p.get("model") or "?"
    data = p.get("data_name") or p.get("data") or "the bundled instruction set"
    return f"ours: {model}, {p.get('max_steps', '?')} steps on {data}, held-out perplexity and exact match"


def _anchor_verdict(name: str, comp: Comparison | None, metric: str, family: Family) -> tuple[str, str]:
    """(agrees / disagrees / cannot tell / not comparable on this base, the numbers behind it)."""
    pairs, why = _anchor_pairs(name, comp, metric)
    tests = [(comp.value(a), comp.value(b), judged(family, a, b, metric)) for a, b in pairs]
    if name == "quantization" and comp is not None and (grid := _base_grid(comp)):
        numbers = "; ".join(f"{a} vs {b}: {j.text()}" for a, b, j in tests) or why
        return NOT_COMPARABLE, f"{grid}; {numbers}"
    if not tests:
        return CANNOT_TELL, why
    if name == "modules":
        return _directional_verdict(tests)
    return _no_difference_verdict(tests)


def _base_grid(comp: Comparison) -> str:
    """Why a storage comparison on a base dequantized from a GGUF does not test QLoRA's claim; "" otherwise."""
    types = sorted({r.base_gguf_type for c in comp.configurations for r in c.runs if r.base_gguf_type})
    if not types:
        return ""
    bits = {m.group(1) for t in types if (m := re.search(r"Q(\d+)", t.upper()))}
    grid = f"a {bits.pop()}-bit grid" if len(bits) == 1 else "a quantization grid"
    return (
        f"the base's 16-bit weights were dequantized from a {', '.join(types)} GGUF: bf16 already sits on {grid}, "
        "so nf4 and int8 re-quantize a rounded model"
    )


def _worse_beyond_margin(j: Judgement) -> bool:
    """Worse beyond noise (Holm) and by more than the margin over its whole interval; never without a margin."""
    if not j.beyond_noise or j.improves or j.margin is None or j.ratio is None or j.ratio[1] is None:
        return False
    _, low, high = j.ratio
    return high < 1 / j.margin if METRICS[j.effect.metric].higher_is_better else low > j.margin


def _no_difference_verdict(tests: list[tuple[str, str, Judgement]]) -> tuple[str, str]:
    """A 'no difference' claim: agrees when every test shows equivalence, disagrees when one is worse beyond noise
    and by more than the margin, else cannot tell (never agrees because no difference was detected)."""
    a, b, j = max(tests, key=lambda t: abs(t[2].effect.diff or 0))
    largest = f"largest gap {a} vs {b}: {j.text()}"
    if all(j.equivalent for _, _, j in tests):
        return AGREES, f"all {len(tests)} equivalent within {margin_text(j.margin)}; {largest}"
    against = [f"{a} vs {b}" for a, b, j in tests if _worse_beyond_margin(j)]
    if against:
        return DISAGREES, f"{', '.join(against)} worse beyond noise and by more than the margin; {largest}"
    if j.margin is None:
        return CANNOT_TELL, f"no equivalence margin is declared for {METRICS[j.effect.metric].label}; {largest}"
    return CANNOT_TELL, f"not every one shown equivalent, none shown worse by more than the margin; {largest}"


def _directional_verdict(tests: list[tuple[str, str, Judgement]]) -> tuple[str, str]:
    """'a is better than each b': agrees when every a beats its b beyond noise (and not within the margin),
    disagrees when a b is better beyond noise or equivalent to a, else cannot tell."""
    against = [(a, b, j) for a, b, j in tests if j.equivalent or (j.beyond_noise and not j.improves)]
    if against:
        a, b, j = against[0]
        names = ", ".join(b for _, b, _ in against)
        return DISAGREES, f"{names} not beaten by {a} (better or equivalent); vs {b}: {j.text()}"
    a, b, j = min(tests, key=lambda t: abs(t[2].effect.diff or 0))
    if all(j.beyond_noise and j.improves for _, _, j in tests):
        return AGREES, f"{a} better than all {len(tests)} beyond noise; closest {b}: {j.text()}"
    return CANNOT_TELL, f"not every one beaten beyond noise; closest {b}: {j.text()}"


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
    equivalent: list[Configuration]  # fit too, and their perplexity is equivalent to the best's within the margin
    fitting: int
    others: tuple[Configuration, ...] = ()  # every other configuration that fits (tested against the best)
    beaten: tuple[Configuration, ...] = ()  # of the others, those the best is better than beyond noise (Holm)
    undecided: tuple[Configuration, ...] = ()  # neither beaten nor equivalent: the best only by its mean


def recommend(
    configs: list[Configuration], budgets_mb: list[float], family: Family | None = None
) -> list[Recommendation]:
    """The lowest mean perplexity among configurations whose every seed peaked under the budget; with the
    family (closed, holding the tests plan_tests added), also those that fit and are equivalent to it."""
    out = []
    for budget in budgets_mb:
        fit = [
            c for c in configs if PERPLEXITY in c.stats and c.worst_peak_mb is not None and c.worst_peak_mb <= budget
        ]
        best = min(fit, key=lambda c: c.mean(PERPLEXITY)) if fit else None
        others = tuple(c for c in fit if c is not best)
        verdicts = {c.key: judged(family, c, best, PERPLEXITY) for c in others} if family else {}
        equivalent = [c for c in others if c.key in verdicts and verdicts[c.key].equivalent]
        beaten = tuple(c for c in others if c.key in verdicts and verdicts[c.key].verdict == WORSE)
        undecided = tuple(c for c in others if c.key in verdicts and c not in beaten and c not in equivalent)
        out.append(Recommendation(budget, best, equivalent, len(fit), others, beaten, undecided))
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
    close = ", ".join(c.label for c in last.equivalent)
    at = f" at {last.budget_mb:,.0f} MB" if several else ""
    em = best.stats.get(EXACT_MATCH)
    em_text = f"exact match {cell(em, EXACT_MATCH)}%" if em else "exact match not measured"
    undecided = ", ".join(c.label for c in last.undecided)
    return (
        f"{budgets}: {best.label} (perplexity {cell(best.stats[PERPLEXITY], PERPLEXITY)}, {em_text}, "
        f"peak {best.worst_peak_mb:,.0f} MB); {fits} configurations fit"
        + (
            f"; equivalent to it in perplexity{at}: {close}"
            if close
            else f"; no other that fits{at} is shown equivalent to it in perplexity"
        )
        + (f"; better beyond noise than {', '.join(c.label for c in last.beaten)}" if last.beaten else "")
        + (
            f"; against {undecided} cannot tell: the best by its mean only, any of these as good a choice as the "
            "study can say"
            if undecided
            else ""
        )
    )


def base_provenance(runs: list[RunData]) -> list[str]:
    """Where each base's weights came from, for runs that record it (tags base_gguf_type, base_checkpoint_dtype)."""
    seen: dict[tuple[str, str, str], None] = {}
    for r in runs:
        if r.base_gguf_type or r.base_checkpoint_dtype:
            base = r.params.get("base_model") or r.params.get("model") or "?"
            seen[(base, r.base_gguf_type, r.base_checkpoint_dtype)] = None
    lines = []
    for base, gguf, dtype in seen:
        stored = f", checkpoint dtype {dtype}" if dtype else ""
        if gguf:
            lines.append(
                f"Base {base}: 16-bit weights dequantized from a {gguf} GGUF{stored}; they already lie on its "
                "quantization grid, so findings on the base's storage (nf4, int8 against bf16) are about "
                "re-quantizing an already rounded model."
            )
        else:
            lines.append(f"Base {base}: not from a GGUF{stored}.")
    return lines


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
    family: Family  # every test the report states, Holm-corrected
    provenance: list[str]  # where the base's weights came from, when the runs record it
    val_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # val/loss per step of each run
    declared: list[DeclaredContrast] = field(default_factory=list)  # the study's declared contrasts
    declared_lines: list[str] = field(default_factory=list)
    family_lines: list[str] = field(default_factory=list)  # the declared contrasts per task family (exploratory)


def plan_tests(
    family: Family,
    configs: list[Configuration],
    comparisons: list[Comparison],
    baselines: list[RunData],
    recommendations: list[Recommendation],
    declared: list[DeclaredContrast] = (),
) -> None:
    """Add to the family every test whose verdict the report states: the declared contrasts first (their own
    Holm family), then, exploratory where contrasts are declared, each comparison's configurations against its
    reference (every finding metric), the anchors' tests, the adapters against the base alone, and the
    configurations that fit a budget against its best."""
    for d in declared:
        add_declared(family, d)
    for comp in comparisons:
        for c in comp.configurations:
            for metric in FINDING_METRICS if c is not comp.reference else ():
                add_test(family, c, comp.reference, metric)
    by_name = {c.name: c for c in comparisons}
    for name in ANCHOR_CLAIMS:
        for metric in QUALITY:
            for a, b in _anchor_pairs(name, by_name.get(name), metric)[0]:
                add_test(family, a, b, metric)
    for base in baselines:
        for metric in QUALITY:
            for c in _baseline_members(configs, base, metric):
                add_test(family, c, base, metric)
    for r in recommendations:
        for c in r.others:
            add_test(family, c, r.best, PERPLEXITY)


def build_report(
    scope: Scope,
    *,
    defaults: dict[str, object],
    margin: float = 1.02,
    alpha: float = 0.05,
    budgets_mb: list[float] | None = None,
    loss_curves: dict[str, list[tuple[int, float]]] | None = None,
    memory_points: list[MemoryPoint] | None = None,
    memory_notes: list[str] | None = None,
    val_curves: dict[str, list[tuple[int, float]]] | None = None,
    contrasts: list[Contrast] | None = None,
    per_example: dict[str, dict[str, list]] | None = None,
) -> Report:
    """Aggregate, compare and decide.

    Args:
        scope: the runs to report (fetch_scope).
        defaults: the train defaults, which pick each comparison's reference configuration.
        margin: the equivalence margin, a perplexity ratio (1.02: within ±2 %).
        alpha: the level of every test, after Holm's correction over the report's tests.
        budgets_mb: the memory budgets to recommend for; None: a round ladder over the measured peaks.
        loss_curves: train/loss per step of each run id (fetch_loss_curves), for the loss chart.
        val_curves: val/loss per step of each run id (fetch_loss_curves(..., "val/loss")), for the validation chart.
        memory_points: predicted against measured peak memory (predict_peak_memory), for the memory chart.
        memory_notes: the runs predict_peak_memory left out, and why.
        contrasts: the contrasts the study declared (its study_contrasts tag): when given, they alone form the
            confirmatory Holm family and every other test is exploratory.
        per_example: per-example losses by run id (runs.fetch_per_example_losses); None or empty: intervals count
            the seeds' noise alone.

    Returns:
        Everything the report writes, as data.
    """
    configs = group_configurations(scope.runs)
    if per_example:  # none at all (runs from before the artifact): seed noise only, said once in the Methods
        for c in configs:
            c.losses = {r.seed: per_example[r.run_id] for r in c.runs if r.run_id in per_example}
    comparisons = find_comparisons(configs, defaults=defaults)
    peaks = [c.worst_peak_mb for c in configs if c.worst_peak_mb is not None]
    budgets = budgets_mb or (budget_ladder(peaks) if peaks else [])
    family = Family(alpha=alpha, margin=margin)
    declared = match_contrasts(contrasts or [], configs, defaults)
    plan_tests(family, configs, comparisons, scope.baselines, recommend(configs, budgets), declared)
    family.close()
    return Report(
        scope=scope,
        configurations=configs,
        comparisons=comparisons,
        findings=[f for comp in comparisons for f in compare(comp, family)],
        baseline_lines=baseline_findings(configs, scope.baselines, family),
        anchors=check_anchors(comparisons, family),
        fronts={m: frontier(configs, m) for m in QUALITY if any(m in c.stats for c in configs)},
        recommendations=recommend(configs, budgets, family),
        loss_curves=loss_curves or {},
        memory_points=memory_points or [],
        notes=scope.notes
        + ([] if EXACT_MATCH in {m for c in configs for m in c.stats} else ["exact match not measured by any run"])
        + (memory_notes or []),
        family=family,
        provenance=base_provenance(scope.runs),
        val_curves=val_curves or {},
        declared=declared,
        declared_lines=declared_lines(declared, family),
        family_lines=family_lines(declared, alpha, margin),
    )
