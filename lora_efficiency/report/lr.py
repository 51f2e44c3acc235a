"""The report's section "Learning rates": how each configuration's learning rate was chosen, or that it was not.

A sweep with an `lr_grid` (lora_efficiency.lr_tuning) runs pilots, one per learning rate of each configuration, tagged
sweep_role=pilot and lr_group=<the configuration without lr and seed>; its main runs carry the same lr_group and
lr_tuned, lr_chosen_from, lr_selected_by. Scope.pilots holds every pilot of the experiment (they are no
configuration); this module keeps those of the scope, and writes for each lr_group its pilots' final validation
losses, their training-loss curves and the learning rate chosen. Without tuning it says plainly what one learning
rate for every configuration can confound.

Call order: pilots_in_scope(scope) (whose train/loss curves the report entry point fetches with the runs') ->
lr_section(report), which render.py places in the document. Blocks are render.py's tuples: ("h2", text),
("p", text), ("ul", items), ("table", header, rows).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

from lora_efficiency.lr_tuning import CHOSEN_FROM, GROUP, GROUP_LABEL, METRICS, SELECTED_BY, TUNED, fmt_lr
from lora_efficiency.report.findings import Report
from lora_efficiency.report.runs import RunData, Scope

TITLE = "Learning rates"
CURVE_POINTS = 5  # points of a pilot's training-loss curve written in the table
CONFOUND = (
    "a configuration that moves further per step at this LR can look better for that reason alone (what this can "
    "confound: the modules and rank comparisons)"
)
HOW = (
    "Each configuration's learning rate was chosen by pilots: one run per learning rate of the grid, at one seed "
    "(pilot_seed; the first main seed where none was set), for the pilot's steps; the lowest final validation loss "
    "(val/loss, or eval/loss where a pilot logged no val/loss) won, a tie going to the smaller rate; a failed or "
    "diverged pilot was left out. Every seed of the configuration then trained at the chosen rate. Pilots are not "
    "configurations: they appear only here."
)


def pilots_in_scope(scope: Scope) -> list[RunData]:
    """The pilots of the report's scope: children of its root or of its sweep runs, and every pilot of an lr_group
    that one of its runs belongs to (a resumed sweep reuses the pilots of its first try)."""
    if scope.root is None:
        return list(scope.pilots)
    parents = {scope.root.run_id} | {r.run_id for r in scope.sweeps}
    groups = {r.tags[GROUP] for r in scope.runs if GROUP in r.tags}
    return [p for p in scope.pilots if p.tags.get("mlflow.parentRunId") in parents or p.tags.get(GROUP) in groups]


def _lr(run: RunData) -> float | None:
    try:
        return float(run.params["lr"])
    except (KeyError, ValueError):
        return None


def _one_per_lr(pilots: list[RunData]) -> dict[float, RunData]:
    """The pilot of each learning rate: its FINISHED run if it has one, else its latest try."""
    chosen: dict[float, RunData] = {}
    for p in sorted(pilots, key=lambda r: (r.status == "FINISHED", r.start_ms)):
        if (lr := _lr(p)) is not None:
            chosen[lr] = p
    return dict(sorted(chosen.items()))


def _curve(points: list[tuple[int, float]]) -> str:
    """A training-loss curve in a few points: `2.41 (step 1) -> ... -> 1.88 (step 50)`."""
    if not points:
        return "-"
    picks = sorted({round(i * (len(points) - 1) / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)})
    return " -> ".join(f"{points[i][1]:.3f} (step {points[i][0]})" for i in picks)


def _pilot_cell(p: RunData) -> str:
    steps = p.params.get("max_steps", "?")
    if p.status == "FINISHED":
        return f"FINISHED, {steps} steps"
    error = (p.tags.get("error") or "no error recorded").splitlines()[0][:160]
    return f"{p.status}: {error}"


def _loss_cell(p: RunData, metric: str) -> str:
    value = p.metrics.get(metric)
    if value is None:
        return "-"
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _group_rows(
    label: str, pilots: list[RunData], mains: list[RunData], curves: Mapping[str, list[tuple[int, float]]]
) -> list[list[str]]:
    """The table rows of one lr_group: one per learning rate of its pilots, the chosen one marked."""
    by_lr = _one_per_lr(pilots)
    chosen = {_lr(m) for m in mains}
    metric = next((m.tags[SELECTED_BY] for m in mains if SELECTED_BY in m.tags), METRICS[0])
    grid = next((m.tags[CHOSEN_FROM] for m in mains if CHOSEN_FROM in m.tags), ",".join(map(fmt_lr, by_lr)))
    rows = []
    for lr, p in by_lr.items():
        mark = f"chosen (lowest {metric})" if lr in chosen else ""
        rows.append([label, fmt_lr(lr), _pilot_cell(p), _loss_cell(p, metric), _curve(curves.get(p.run_id, [])), mark])
    if not mains:
        rows.append([label, "-", f"grid {grid}", "-", "-", "none: no main run (every pilot failed or diverged?)"])
    return rows


def _untuned_line(untuned: list[RunData], *, some_tuned: bool) -> str:
    lrs = sorted({lr for r in untuned if (lr := _lr(r)) is not None})
    rates = ", ".join(map(fmt_lr, lrs)) or "?"
    if some_tuned:
        configs = sorted({r.config_hash for r in untuned})
        return (
            f"{len(configs)} configuration(s) were not tuned and trained at {rates}: compared with the tuned ones, "
            "they may be held back, or helped, by their learning rate alone."
        )
    if len(lrs) <= 1:
        return f"No learning-rate tuning: all configurations trained at one learning rate ({rates}); {CONFOUND}."
    return (
        f"No learning-rate tuning: the configurations trained at the learning rates the sweep files gave ({rates}), "
        f"not at one tuned per configuration; {CONFOUND.replace('at this LR', 'at its LR')}."
    )


def lr_section(report: Report) -> list[tuple]:
    """The section "Learning rates" as render.py's blocks: a table of the pilots per configuration (when any
    configuration was tuned), and a plain line for the runs trained at an untuned learning rate."""
    scope = report.scope
    mains: dict[str, list[RunData]] = defaultdict(list)
    for r in scope.runs:
        if r.tags.get(TUNED) == "true" and GROUP in r.tags:
            mains[r.tags[GROUP]].append(r)
    pilots: dict[str, list[RunData]] = defaultdict(list)
    for p in pilots_in_scope(scope):
        pilots[p.tags.get(GROUP, "")].append(p)
    untuned = [r for r in scope.runs if not (r.tags.get(TUNED) == "true" and GROUP in r.tags)]
    blocks: list[tuple] = [("h2", TITLE)]
    if pilots:
        header = ["configuration", "learning rate", "pilot", "final validation loss", "training loss curve", "chosen"]
        rows = []
        for group in sorted(pilots, key=lambda g: _label(g, pilots[g], mains[g])):
            rows += _group_rows(
                _label(group, pilots[group], mains[group]), pilots[group], mains[group], report.loss_curves
            )
        blocks += [("p", HOW), ("table", header, rows)]
        blocks += [("ul", notes)] if (notes := _notes(pilots, mains)) else []
    if untuned:
        blocks.append(("p", _untuned_line(untuned, some_tuned=bool(pilots))))
    return blocks


def _label(group: str, pilots: list[RunData], mains: list[RunData]) -> str:
    return next((r.tags[GROUP_LABEL] for r in (*mains, *pilots) if GROUP_LABEL in r.tags), group[:8] or "?")


def _notes(pilots: Mapping[str, list[RunData]], mains: Mapping[str, list[RunData]]) -> list[str]:
    """What to keep in mind: pilots shorter than their main runs, a choice by eval/loss, rates at a grid's edge."""
    notes = []
    for group, runs in pilots.items():
        label = _label(group, runs, mains.get(group, []))
        main_steps = {m.params.get("max_steps") for m in mains.get(group, [])}
        pilot_steps = {p.params.get("max_steps") for p in runs}
        if main_steps and pilot_steps and main_steps != pilot_steps:
            notes.append(
                f"{label}: pilots of {', '.join(sorted(pilot_steps))} steps chose the rate of main runs of "
                f"{', '.join(sorted(main_steps))} steps; a short pilot rewards fast early progress, which can favour "
                "a larger rate than the best one for the whole run"
            )
        if any(m.tags.get(SELECTED_BY) == METRICS[1] for m in mains.get(group, [])):
            notes.append(
                f"{label}: chosen by eval/loss (the final evaluation's examples): the pilots logged no val/loss"
            )
        scored = sorted({p.seed for p in runs} & {m.seed for m in mains.get(group, [])})
        if scored:
            notes.append(
                f"{label}: its pilots trained at seed {', '.join(map(str, scored))}, which its main runs are scored "
                "on: that seed's main run repeats the pilot that chose its rate (a pilot_seed outside the seeds "
                "avoids it)"
            )
        lrs, chosen = sorted(_one_per_lr(runs)), {_lr(m) for m in mains.get(group, [])}
        if len(lrs) > 1 and chosen & {lrs[0], lrs[-1]}:
            notes.append(f"{label}: the chosen rate is at the edge of the grid: the best one may lie beyond it")
    return notes
