"""The learning rate per configuration: a sweep's `lr_grid`, its pilot runs, and the choice among them.

With one learning rate for every configuration, the configuration that moves further per step (more adapted
matrices, a larger alpha/r) can look better for that reason alone; LoRA's best learning rate is about 10x full
fine-tuning's ("LoRA Without Regret", Schulman et al. 2025). A sweep file or a profile may therefore declare

    lr_grid: [1.0e-4, 2.0e-4, 5.0e-4]             # one grid for every configuration
    lr_grid: {lora: [1.0e-4, 5.0e-4], full: [1.0e-5, 5.0e-5]}   # or a grid per training method (`method`)
    pilot_steps: 50                               # how long a pilot trains (default: the configuration's max_steps)
    pilot_seed: 1000                              # pilots' seed, outside the main seeds (default: the first seed)

A profile's value wins over the sweep file's, key by key (as its `seeds` and `train` do). For each configuration
(the sweep's settings without the seed) the sweep first runs one pilot per learning rate of the grid, at pilot_seed
(else the first seed), for pilot_steps steps with eval_every=pilot_steps; the lowest final `val/loss` wins
(`eval/loss` when a pilot logged no val/loss); failed or diverged pilots are left out. Then every seed trains at
that rate. A pilot at a main seed trains on that seed's batches, so its main run repeats the run that chose its
rate (the rate is scored on the run it was picked by); a pilot_seed outside the seeds keeps the choice apart.

Only this module decides: the grid (parse_lr_grid), the pilots (pilot_config, pilot_key, group_id), the choice
(choose_lr) and the tags runs carry (pilot_tags, main_tags). lora_efficiency.sweep runs the pilots and the main
runs as two phases; lora_efficiency.report.lr reads them back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lora_efficiency.configuration import sweep_key
from lora_efficiency.errors import ConfigError, UserError, invalid
from lora_efficiency.settings import METHODS, TrainConfig

LR_KEYS = ("lr_grid", "pilot_steps", "lr_grid_extend", "pilot_seed")
MAX_EXTEND = 5  # pilots past a grid's edge, per configuration
ANY_METHOD = "*"  # the grid of a plain list: every method
# Tags of the runs of a tuned sweep (and of main runs without a grid: sweep_role, lr_group, lr_tuned=false).
ROLE, GROUP, GROUP_LABEL = "sweep_role", "lr_group", "lr_group_label"
TUNED, CHOSEN_FROM, SELECTED_BY = "lr_tuned", "lr_chosen_from", "lr_selected_by"
PILOT, MAIN = "pilot", "main"
METRICS = ("val/loss", "eval/loss")  # preferred first: the pilot's validation loss, else its final evaluation
GRID_ALLOWED = "a non-empty list of learning rates in (0, 1), or a mapping {lora: [...], full: [...]} of such lists"


def fmt_lr(lr: float) -> str:
    """A learning rate as tags and names write it: 0.0002, 1e-05."""
    return f"{lr:g}"


@dataclass(frozen=True)
class LrGrid:
    """The learning rates to try per training method, how long a pilot trains (None: as long as its main runs),
    and how many pilots may be added past the grid's edge when the best rate sits on it (`beyond_edge`)."""

    grids: Mapping[str, tuple[float, ...]]
    pilot_steps: int | None = None
    extend: int = 0
    pilot_seed: int | None = None  # None: the sweep's first seed (where pilots trained before pilot_seed existed)

    def for_method(self, method: str) -> tuple[float, ...] | None:
        return self.grids.get(method, self.grids.get(ANY_METHOD))

    def steps(self, config: TrainConfig) -> int:
        return self.pilot_steps or config.max_steps


def _learning_rate(value: Any) -> float | None:
    """A grid value as a float in (0, 1), else None. YAML reads `1e-4` (no dot) as text: it is accepted too."""
    if isinstance(value, bool):
        return None
    try:
        lr = float(value)
    except (TypeError, ValueError):
        return None
    return lr if 0 < lr < 1 else None


def _one_grid(value: Any, field: str) -> tuple[tuple[float, ...], list[str]]:
    if not isinstance(value, list) or not value:
        return (), [invalid(field, value, GRID_ALLOWED)]
    lrs = [_learning_rate(v) for v in value]
    bad = [v for v, lr in zip(value, lrs, strict=True) if lr is None]
    if bad:
        return (), [invalid(field, value, f"{GRID_ALLOWED} ({', '.join(map(repr, bad))} is not)")]
    return tuple(dict.fromkeys(lrs)), []  # in order, repeats once


def parse_lr_grid(grid: Any, pilot_steps: Any = None, extend: Any = None, pilot_seed: Any = None) -> LrGrid | None:
    """The grid of a sweep file or profile (None when it declares none), checked.

    Raises:
        ConfigError: one problem per bad field, naming the field, the value and what is allowed.
    """
    problems: list[str] = []
    if pilot_steps is not None and (
        isinstance(pilot_steps, bool) or not isinstance(pilot_steps, int) or pilot_steps < 1
    ):
        problems.append(invalid("pilot_steps", pilot_steps, "an integer >= 1 (the steps each pilot trains)"))
    bad_extend = isinstance(extend, bool) or not isinstance(extend, int) or not 0 <= extend <= MAX_EXTEND
    if extend is not None and bad_extend:
        problems.append(
            invalid("lr_grid_extend", extend, f"an integer from 0 to {MAX_EXTEND} (pilots added past the grid's edge)")
        )
    if pilot_seed is not None and (
        isinstance(pilot_seed, bool) or not isinstance(pilot_seed, int) or not 0 <= pilot_seed < 2**32
    ):
        problems.append(invalid("pilot_seed", pilot_seed, "an integer from 0 to 2^32-1 (the seed pilots train at)"))
    grids: dict[str, tuple[float, ...]] = {}
    if isinstance(grid, dict):
        if not grid:
            problems.append(invalid("lr_grid", grid, GRID_ALLOWED))
        for method, values in grid.items():
            if method not in METHODS:
                problems.append(invalid(f"lr_grid.{method}", values, f"a method is one of {', '.join(METHODS)}"))
                continue
            grids[method], found = _one_grid(values, f"lr_grid.{method}")
            problems += found
    elif grid is not None:
        grids[ANY_METHOD], problems_grid = _one_grid(grid, "lr_grid")
        problems += problems_grid
    if problems:
        raise ConfigError(problems)
    return LrGrid(grids, pilot_steps, extend or 0, pilot_seed) if grid is not None else None


def lr_settings(spec: Mapping[str, Any], profile: Mapping[str, Any]) -> LrGrid | None:
    """The grid of a sweep: each of lr_grid, pilot_steps, lr_grid_extend and pilot_seed from the profile if it has it,
    else the sweep file."""
    grid, steps, extend, seed = (profile.get(k, spec.get(k)) for k in LR_KEYS)
    return parse_lr_grid(grid, steps, extend, seed)


def check_grid_fits(grid: LrGrid, configs: Sequence[tuple[str, TrainConfig, Mapping[str, Any]]]) -> list[str]:
    """Problems of a grid with a sweep's configurations (label, settings, what the sweep varies): a method without
    a grid, lr as an axis (the grid chooses it)."""
    problems = []
    for label, config, variant in configs:
        if "lr" in variant:
            problems.append(f"[{label}] lr is set by the configuration and lr_grid chooses it: give one of the two")
        if grid.for_method(config.method) is None:
            problems.append(
                f"[{label}] lr_grid={dict(grid.grids)!r} has no grid for method={config.method!r}: add one, or give "
                "lr_grid as a plain list"
            )
    return problems


def group_id(config: TrainConfig, data_fingerprint: str, model_revision: str = "") -> str:
    """The configuration without learning rate and seed: what its pilots and its main runs share (tag lr_group)."""
    settings = {k: v for k, v in config.flat().items() if k not in ("lr", "seed")}
    return sweep_key(settings, data_fingerprint, model_revision)


def pilot_config(config: TrainConfig, lr: float, steps: int, seed: int | None = None) -> TrainConfig:
    """One pilot of `config`: `steps` steps at `lr` (at `seed`, else the config's), the validation loss at its last
    step, no generated answers (exact match plays no part in the choice)."""
    seed = config.seed if seed is None else seed
    return config.replace(lr=lr, max_steps=steps, eval_every=steps, generate_samples=0, seed=seed)


def pilot_key(config: TrainConfig, data_fingerprint: str, model_revision: str = "") -> str:
    """A pilot's sweep_key: never a main run's, even when the pilot trains exactly like one."""
    return sweep_key({**config.flat(), ROLE: PILOT}, data_fingerprint, model_revision)


@dataclass(frozen=True)
class PilotResult:
    """One pilot as it ended: FINISHED with its final metrics, or failed with its error."""

    lr: float
    run_id: str
    status: str
    metrics: Mapping[str, float]
    error: str = ""


@dataclass(frozen=True)
class Choice:
    """The learning rate a configuration's main runs train at, what chose it, and the pilots left out."""

    lr: float
    metric: str  # val/loss or eval/loss
    value: float
    grid: tuple[float, ...]
    excluded: tuple[str, ...] = ()


class NoLearningRate(UserError):
    """Every pilot of a configuration failed or diverged: its main runs cannot start."""


def choose_lr(pilots: Sequence[PilotResult], *, label: str = "") -> Choice:
    """The pilot with the lowest final val/loss (eval/loss when a FINISHED pilot logged no val/loss, the same
    metric for all); a failed pilot, or one whose loss is NaN or infinite, is left out. A tie goes to the smaller
    learning rate.

    Raises:
        NoLearningRate: no pilot is left.
    """
    finished = [p for p in pilots if p.status == "FINISHED"]
    metric = METRICS[0] if all(METRICS[0] in p.metrics for p in finished) else METRICS[1]
    usable, excluded = [], []
    for p in pilots:
        value = p.metrics.get(metric, math.nan) if p.status == "FINISHED" else math.nan
        if math.isfinite(value):
            usable.append((value, p.lr))
        elif p.status != "FINISHED":
            excluded.append(f"lr={fmt_lr(p.lr)}: {p.status} ({p.error or 'no error recorded'})"[:300])
        else:
            excluded.append(f"lr={fmt_lr(p.lr)}: diverged ({metric}={value})")
    grid = tuple(p.lr for p in pilots)
    if not usable:
        raise NoLearningRate(
            f"[{label}] no learning rate could be chosen: all {len(pilots)} pilots of lr_grid "
            f"{','.join(map(fmt_lr, grid))} failed or diverged ({'; '.join(excluded)})"
        )
    value, lr = min(usable)
    return Choice(lr, metric, value, grid, tuple(excluded))


def beyond_edge(choice: Choice) -> float | None:
    """The next rate to try when the chosen one is the highest (or lowest) the configuration's pilots tried: one
    step past it, as large as the grid's outermost step there (1e-3, 3e-3 -> 9e-3), to 2 significant digits. None
    when the choice lies inside what was tried (a higher rate that diverged or failed bounds it too), the grid has
    one rate, or the next one would leave (0, 1).

    A best rate on the grid's edge says only that the optimum may lie beyond it (the 2026-12-02 standard study
    chose the top of every grid); a study that extends until the choice is interior can say where it is."""
    tried = sorted(set(choice.grid))
    if len(tried) < 2:
        return None
    if choice.lr == tried[-1]:
        lr = tried[-1] * tried[-1] / tried[-2]
    elif choice.lr == tried[0]:
        lr = tried[0] * tried[0] / tried[1]
    else:
        return None
    lr = float(f"{lr:.2g}")
    return lr if 0 < lr < 1 and lr not in tried else None


def pilot_tags(group: str, label: str) -> dict[str, str]:
    return {ROLE: PILOT, GROUP: group, GROUP_LABEL: label}


def main_tags(group: str, label: str, choice: Choice | None) -> dict[str, str]:
    """A main run's tags: its configuration's group and, when tuned, the grid and the metric that chose its lr."""
    tags = {ROLE: MAIN, GROUP: group, GROUP_LABEL: label, TUNED: "false"}
    if choice is not None:
        tags |= {TUNED: "true", CHOSEN_FROM: ",".join(map(fmt_lr, choice.grid)), SELECTED_BY: choice.metric}
    return tags
