"""The report's section "Convergence": for every configuration, whether its runs had stopped improving.

Each train run with a validation curve (eval_every > 0) logs the declared test's inputs (val/window_improvement,
converge_tol) and its outcome as the tag `converged` (lora_efficiency.validation says how it is decided; the report
decides again from the inputs, so runs logged under an earlier rule are judged by today's). A configuration is
"got worse" when any seed's validation loss rose by more than converge_tol over the window (the rate was too high
for the run, or it overfit), else "still improving" when any seed is, "converged" only when every seed is; runs
without a curve are "unknown". Comparisons of configurations that are still improving compare how fast each
learns in the budget, not what each can reach: the section says so when that is the case.
"""

from __future__ import annotations

from lora_efficiency.report.findings import Configuration, Report
from lora_efficiency.validation import CONVERGENCE_WINDOW, classify

TITLE = "Convergence"
CONVERGED, IMPROVING, WORSENED, UNKNOWN = "converged", "still improving", "got worse", "unknown"


def status(config: Configuration) -> tuple[str, str]:
    """(the configuration's status, the count behind it: '2 of 3 seeds improving')."""
    tags = [_run_status(r) for r in config.runs]
    n = len(tags)
    improving, converged, worsened = tags.count("improving"), tags.count("converged"), tags.count("worsened")
    if worsened:  # first: a rising validation loss is what a reader must see
        return WORSENED, f"{worsened} of {n} seeds rose by more than converge_tol over the window"
    if improving:
        return IMPROVING, f"{improving} of {n} seeds improving"
    if converged == n:
        return CONVERGED, f"{n} of {n} seeds converged"
    missing = n - converged
    return UNKNOWN, f"{missing} of {n} seeds without a validation curve long enough to tell"


def _run_status(run) -> str:
    """A run's verdict, decided again from what it logged (val/window_improvement, converge_tol) by the declared
    rule, so runs logged under an earlier version of the rule are judged by today's; else its `converged` tag."""
    try:
        return classify(run.metrics["val/window_improvement"], float(run.params["converge_tol"]))
    except (KeyError, ValueError):
        return run.tags.get("converged", "")


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
    if worse := statuses.count(WORSENED):
        blocks.append(
            (
                "p",
                f"{worse} configuration(s) got worse over the second half of training: the validation loss rose, so "
                "the learning rate was too high for the run (or the run overfit). Their numbers say what that rate "
                "did, not what the configuration can reach.",
            )
        )
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
