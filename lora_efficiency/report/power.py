"""The seeds a study's declared contrasts need, from a spread measured in earlier runs (or given), and what they
would cost at those runs' measured training time: what `python -m entrypoints.plan --design <profile>` prints.

    python -m entrypoints.plan --design standard --spread_experiment study-standard
    python -m entrypoints.plan --design standard --sd 0.0148

Each contrast's paired sd is measured on the earlier runs of its own two configurations where they exist (paired by
seed, as the report compares them; with their per-example losses, the examples' noise too, as a floor more seeds do
not reduce); for a contrast the earlier runs did not train, it is the root mean square of the paired sds of every
pair of configurations those runs compared on the metric (said so in its line). The power is
lora_efficiency.design's, planned at alpha / k for Holm over the k declared contrasts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_efficiency.design import Contrast, contrast_power, seeds_needed
from lora_efficiency.report.findings import Configuration, match_contrasts, paired_effect
from lora_efficiency.report.metrics import METRICS

TRAIN_S = "time/train_s"


@dataclass(frozen=True)
class Spread:
    sd: float
    floor: float  # the examples' standard error, which more seeds do not reduce
    source: str  # where the sd comes from, for the line that uses it


def pooled_spread(configs: list[Configuration], metric: str) -> Spread | None:
    """The root mean square of the paired sd of every pair of configurations with 2 or more seeds in common."""
    sds = []
    for i, a in enumerate(configs):
        for b in configs[i + 1 :]:
            e = paired_effect(a, b, metric, None)
            if e.seed_sd is not None:
                sds.append(e.seed_sd)
    if not sds:
        return None
    rms = math.sqrt(sum(s * s for s in sds) / len(sds))
    return Spread(rms, 0.0, f"pooled over the {len(sds)} paired comparisons of the earlier runs (rms)")


def contrast_spread(a: Configuration | None, b: Configuration | None, metric: str) -> Spread | None:
    """The paired spread of a contrast's own configurations in the earlier runs; None where they were not both run
    with 2 seeds in common."""
    if a is None or b is None or a is b:
        return None
    e = paired_effect(a, b, metric, None)
    if e.seed_sd is None:
        return None
    return Spread(e.seed_sd, e.example_se, f"measured on {a.label} vs {b.label}, {e.n} pairs ({e.noise})")


def _cost(a: Configuration | None, b: Configuration | None, seeds: int) -> str:
    """seeds x the measured mean training time of both configurations, where the earlier runs measured it."""
    if a is None or b is None or TRAIN_S not in a.stats or TRAIN_S not in b.stats:
        return "cost: not measured (the earlier runs did not train both configurations)"
    each = a.stats[TRAIN_S].mean + b.stats[TRAIN_S].mean
    steps = a.runs[0].params.get("max_steps", "?")
    return (
        f"cost: {seeds} x ({a.stats[TRAIN_S].mean:,.0f} s + {b.stats[TRAIN_S].mean:,.0f} s) = "
        f"{seeds * each / 3600:,.1f} h of training at the earlier runs' measured time ({steps} steps each)"
    )


def plan_lines(
    contrasts: list[Contrast],
    seeds: int,
    *,
    configs: list[Configuration] = (),
    defaults: dict[str, object] | None = None,
    sd: float = 0.0,
    alpha: float = 0.05,
    target: float = 0.8,
) -> list[str]:
    """Per declared contrast: its spread, the seeds for `target` power after Holm, the power of the profile's own
    `seeds`, and the cost at the earlier runs' measured speed.

    Args:
        contrasts: the profile's declared contrasts.
        seeds: the seeds the profile runs.
        configs: the earlier runs' configurations (with per-example losses where read); empty with `sd`.
        defaults: the settings a contrast's unlisted ones take (the profile's train settings).
        sd: a given paired sd for every contrast; 0: measured in `configs`.
        alpha: the family's level.
        target: the power asked for.

    Returns:
        The lines to print, a header first.
    """
    k = len(contrasts)
    lines = [
        f"{k} declared contrasts, Holm over {k} planned at alpha / {k} = {alpha / k:.3g}; {target:.0%} power; "
        f"the profile runs {seeds} seeds"
    ]
    matched = match_contrasts(contrasts, list(configs), defaults or {}) if configs else []
    for i, c in enumerate(contrasts):
        a, b = (matched[i].a, matched[i].b) if matched else (None, None)
        spread = Spread(sd, 0.0, "given (--sd)") if sd else contrast_spread(a, b, c.metric)
        spread = spread or pooled_spread(list(configs), c.metric)
        head = f"- {c.name}: {c.describe()} on {METRICS[c.metric].label}"
        if spread is None:
            lines.append(f"{head}: no spread (no two earlier configurations share 2 seeds); give --sd")
            continue
        n = seeds_needed(spread.sd, c.margin, c.test, k, target, alpha=alpha, floor=spread.floor)
        now = contrast_power(spread.sd, seeds, c.margin, c.test, k=k, alpha=alpha, floor=spread.floor)
        floor = f", examples' se {spread.floor:.4f}" if spread.floor else ""
        need = (
            f"{n} seeds give {target:.0%} power"
            if n is not None
            else f"no number of seeds gives {target:.0%} power (the examples' noise alone is too large)"
        )
        lines.append(
            f"{head}: paired sd {spread.sd:.4f}{floor} ({spread.source}); {need}; the profile's {seeds} seeds: "
            f"power {now:.2f}; {_cost(a, b, n or seeds) if not sd else 'cost: give --spread_experiment to measure it'}"
        )
    return lines
