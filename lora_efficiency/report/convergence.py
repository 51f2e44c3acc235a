"""The report's section "Convergence": for every configuration, whether its runs had stopped improving.

Each train run with a validation curve (eval_every > 0) carries the declared test's outcome as the tag `converged`
(converged, improving or unknown; lora_efficiency.validation says how it is decided) and the metric
val/window_improvement. A configuration is "converged" only when every seed is; "still improving" when any seed
is; runs without a curve are "unknown". Comparisons of configurations that are still improving compare how fast
each learns in the budget, not what each can reach: the section says so when that is the case.
"""

from __future__ import annotations

from lora_efficiency.report.findings import Configuration, Report
from lora_efficiency.validation import CONVERGENCE_WINDOW

TITLE = "Convergence"
CONVERGED, IMPROVING, UNKNOWN = "converged", "still improving", "unknown"


def status(config: Configuration) -> tuple[str, str]:
    """(the configuration's status, the count behind it: '2 of 3 seeds improving')."""
    tags = [r.tags.get("converged", "") for r in config.runs]
    n = len(tags)
    improving, converged = tags.count("improving"), tags.count("converged")
    if improving:
        return IMPROVING, f"{improving} of {n} seeds improving"
    if converged == n:
        return CONVERGED, f"{n} of {n} seeds converged"
    missing = n - converged
    return UNKNOWN, f"{missing} of {n} seeds without a validation curve long enough to tell"


def _tol(config: Configuration) -> str:
    values = {r.params.get("converge_tol", "") for r in config.runs} - {""}
    return ", ".join(sorted(values)) or "-"


def _window(config: Configuration) -> str:
    values = [r.metrics["val/window_improvement"] for r in config.runs if "val/window_improvement" in r.metrics]
    if not values:
        return "-"
    return f"{100 * sum(values) / len(values):.2f}% (seeds {100 * min(values):.2f}% to {100 * max(values):.2f}%)"


def convergence_section(report: Report) -> list[tuple]:
    """The section as render.py's blocks: an introduction, one row per configuration, what follows."""
    if not report.configurations:
        return []
    rows, statuses = [], []
    for c in report.configurations:
        state, count = status(c)
        statuses.append(state)
        last = [r.metrics["val/loss"] for r in c.runs if "val/loss" in r.metrics]
        rows.append(
            [
                c.label,
                ", ".join(sorted({r.params.get("max_steps", "?") for r in c.runs})),
                f"{sum(last) / len(last):.4f}" if last else "-",
                _window(c),
                _tol(c),
                f"{state} ({count})",
            ]
        )
    intro = (
        "Declared before the data (configs/default.yaml, lora_efficiency/validation.py): a run converged when its "
        f"validation loss (val/loss, on held-out examples apart from the final evaluation's) fell by less than "
        f"converge_tol of its value over the last {CONVERGENCE_WINDOW:.0%} of its steps. A configuration converged "
        "when every seed did. The learning rate decays along a cosine over the same steps, so a flat end can also "
        "mean the rate ran out: converged says a longer run at this schedule would gain little, not that the "
        "configuration has reached what it can."
    )
    header = [
        "configuration",
        "steps",
        "final val/loss (mean)",
        f"val/loss fall over the last {CONVERGENCE_WINDOW:.0%}",
        "converge_tol",
        "status",
    ]
    blocks = [("h2", TITLE), ("p", intro), ("table", header, rows)]
    not_done = [s for s in statuses if s != CONVERGED]
    if not_done:
        blocks.append(("p", _consequence(len(not_done), len(statuses), statuses)))
    return blocks


def _consequence(not_done: int, total: int, statuses: list[str]) -> str:
    if statuses.count(UNKNOWN) == total:
        return (
            "No run logged a validation curve (eval_every=0): whether any configuration had converged cannot be told. "
            "Every comparison below is between runs of one short budget; it compares how fast each configuration "
            "learns, not what each can reach."
        )
    return (
        f"{not_done} of {total} configurations had not converged (or cannot be told): comparisons that involve them "
        "compare how far each got in this budget, not what each can reach; a longer run could change their order."
    )
