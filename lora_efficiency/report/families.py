"""The report's section "Task families": perplexity and exact match (by kind) of every configuration on each task
family of the evaluation set, where the runs logged them (eval/perplexity/<family>, eval/exact_match_by_kind/<family>,
lora_efficiency.evaluation).

Runs logged before those metrics existed, and runs on data without task families, have none: the section says so
instead of showing a table, and a configuration whose seeds logged none shows "-" in it.
"""

from __future__ import annotations

from lora_efficiency.report.findings import Report

TITLE = "Task families"
PERPLEXITY, EXACT_MATCH = "eval/perplexity/", "eval/exact_match_by_kind/"


def families(runs) -> list[str]:
    """The task families any of `runs` logged a per-family metric for, sorted."""
    names = set()
    for run in runs:
        for metric in run.metrics:
            for prefix in (PERPLEXITY, EXACT_MATCH):
                if metric.startswith(prefix):
                    names.add(metric[len(prefix) :])
    return sorted(names)


def _mean_cell(runs, metric: str, *, percent: bool) -> str:
    values = [r.metrics[metric] for r in runs if metric in r.metrics]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{100 * mean:.1f}" if percent else f"{mean:.3f}"


def families_section(report: Report) -> list[tuple]:
    """The section as render.py's blocks: an introduction and one row per configuration (then the baselines)."""
    if not report.configurations:
        return []
    everyone = [r for c in report.configurations for r in c.runs] + list(report.scope.baselines)
    names = families(everyone)
    if not names:
        return [
            ("h2", TITLE),
            (
                "p",
                "No run logged metrics per task family (eval/perplexity/<family>, eval/exact_match_by_kind/<family>):"
                " the runs were made before they were logged, or their evaluation data has no task families. "
                "Perplexity and exact match per family cannot be shown for them.",
            ),
        ]
    header = ["configuration", "seeds"]
    header += [f"{n}: perplexity" for n in names] + [f"{n}: exact match by kind (%)" for n in names]
    rows = []
    groups = [(c.label, c.runs) for c in report.configurations]
    groups += [(f"baseline: no adapter, {b.storage}", [b]) for b in report.scope.baselines]
    for label, runs in groups:
        rows.append(
            [label, str(len(runs))]
            + [_mean_cell(runs, PERPLEXITY + n, percent=False) for n in names]
            + [_mean_cell(runs, EXACT_MATCH + n, percent=True) for n in names]
        )
    intro = (
        "Means over seeds, on the evaluation subset (balanced over task families, the same examples for every run). "
        "Perplexity per family weights each target token equally within the family; the overall perplexity weights "
        "families by their answers' length. Exact match by kind compares numbers as numbers, JSON as values and "
        "text normalised (lora_efficiency/evaluation.py answers_match). '-': the configuration's runs did not log it "
        "(runs made before these metrics, or without exact match)."
    )
    return [("h2", TITLE), ("p", intro), ("table", header, rows)]
