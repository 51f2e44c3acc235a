"""The report's section "Forgetting": per configuration, what training gained on the task against what it lost on
general text, the trade-off of Biderman et al. 2024, "LoRA Learns Less and Forgets Less" (LoRA gains less than full
fine-tuning on the target domain and keeps more of what the base knew outside it).

Task gain: the run's eval/perplexity over the base model alone's on the same examples (the baseline of its storage),
below 1 when training helped. Forgetting: forget/ratio, the run's perplexity on held-out general text (passages of
the Python reference, lora_efficiency.evaluation.forgetting_metrics) after training over the same text scored before
its first step, above 1 when the run lost some of it. Both are ratios: their means and 95% intervals over seeds are
taken on the log scale (geometric means), as the report compares perplexities.

Runs from before the forgetting metrics (or with forget_samples 0) have none: the section says so instead of a table.
"""

from __future__ import annotations

import math

from lora_efficiency.report.findings import Report
from lora_efficiency.report.stats import Stat

TITLE = "Forgetting"
RATIO, AFTER, BEFORE = "forget/ratio", "forget/perplexity", "forget/base_perplexity"
PERPLEXITY = "eval/perplexity"


def log_ratio_cell(ratios: list[float]) -> str:
    """The geometric mean of positive ratios and its 95% interval over seeds (t on the logs): '0.351 [0.340,
    0.362]'; '0.351 (1 seed)'; '-' for none."""
    if not ratios:
        return "-"
    stat = Stat(tuple(math.log(r) for r in ratios))
    if stat.n == 1:
        return f"{ratios[0]:.3f} (1 seed)"
    if stat.half_width is None or stat.half_width == 0:
        return f"{math.exp(stat.mean):.3f}"
    return f"{math.exp(stat.mean):.3f} [{math.exp(stat.low):.3f}, {math.exp(stat.high):.3f}]"


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "-"


def forgetting_section(report: Report) -> list[tuple]:
    """The section as render.py's blocks: what it shows and why, then one row per configuration."""
    if not report.configurations:
        return []
    runs = [r for c in report.configurations for r in c.runs]
    if not any(RATIO in r.metrics for r in runs):
        return [
            ("h2", TITLE),
            (
                "p",
                f"No run logged forgetting ({RATIO}, {AFTER}, {BEFORE}): the runs were made before these metrics, or "
                "with forget_samples 0. What each configuration lost on general text against what it gained on the "
                'task (Biderman et al. 2024, "LoRA Learns Less and Forgets Less") cannot be shown for them.',
            ),
        ]
    base = {b.storage: b.metrics[PERPLEXITY] for b in report.scope.baselines if PERPLEXITY in b.metrics}
    header = [
        "configuration",
        "seeds",
        "task gain: perplexity / the base alone's",
        "general text: perplexity before",
        "general text: perplexity after",
        "forgetting: after / before",
    ]
    rows = []
    for c in report.configurations:
        storage = c.settings.get("quantization", "")
        gains = [r.metrics[PERPLEXITY] / base[storage] for r in c.runs if PERPLEXITY in r.metrics and storage in base]
        gain = log_ratio_cell(gains) if storage in base else f"no {storage or 'matching'} baseline"
        ratios = [r.metrics[RATIO] for r in c.runs if RATIO in r.metrics]
        rows.append(
            [
                c.label,
                str(len(c.runs)),
                gain,
                _mean([r.metrics[BEFORE] for r in c.runs if BEFORE in r.metrics]),
                _mean([r.metrics[AFTER] for r in c.runs if AFTER in r.metrics]),
                log_ratio_cell(ratios),
            ]
        )
    intro = (
        "What each configuration gained on its task against what it lost on general text, the trade-off of Biderman "
        'et al. 2024, "LoRA Learns Less and Forgets Less" (LoRA gains less than full fine-tuning on the target domain '
        "and forgets less of what the base knew outside it; they measure code and math against general benchmarks). "
        "Task gain: held-out perplexity after training over the base model alone's on the same examples (below 1: "
        "training helped). Forgetting: perplexity on held-out general text (passages of the Python reference, not "
        "the task) after training over the same text before the first step (above 1: the run lost some of it). "
        "Geometric means over seeds with 95% intervals (t on the logs); '-': the configuration's runs did not log "
        "it. Shown, not tested: the declared contrasts are judged in Findings."
    )
    return [("h2", TITLE), ("p", intro), ("table", header, rows)]
