"""The report's charts, one PNG each: rank, the efficiency frontier, modules, storage, loss curves, speed against
memory and predicted against measured memory.

Only this module draws. It uses matplotlib.figure.Figure, whose savefig renders with the Agg canvas: no pyplot
state, no display needed. matplotlib is imported inside the functions that draw, so reading and aggregating runs
never loads it.
"""

from __future__ import annotations

import io
import textwrap
from collections import defaultdict
from pathlib import Path

from lora_efficiency.report.files import write_file
from lora_efficiency.report.findings import Comparison, Configuration, Report
from lora_efficiency.report.metrics import METRICS, PEAK_MB, PERPLEXITY, QUALITY
from lora_efficiency.report.runs import MemoryPoint
from lora_efficiency.report.stats import Stat

CHART_TITLES = {
    "rank": "Rank against quality and trainable parameters",
    "frontier": "Efficiency frontier: quality against peak memory",
    "modules": "Target modules: quality, trainable parameters, memory",
    "quantization": "Storage of the base: quality, memory, speed",
    "loss_curves": "Training loss curves",
    "val_curves": "Validation loss curves",
    "speed_memory": "Training speed against peak memory",
    "memory_estimate": "Predicted against measured peak memory",
}
INTERVALS = "error bars: 95% interval of the mean over seeds"


def _figure(ncols: int, title: str, *, width: float = 5.0, height: float = 4.4):
    """A Figure of `ncols` panels in a row under one title, each with a light grid."""
    from matplotlib.figure import Figure  # lazy: ~0.5 s, only when a chart is drawn (the report's tests mostly don't)

    fig = Figure(figsize=(width * ncols, height), layout="constrained", dpi=110)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
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


def _percent_from_zero(ax, metric: str) -> None:
    """A fraction's axis (exact match, in %) starts at zero and shows at least 0 to 5 %."""
    if METRICS[metric].fraction:
        ax.set_ylim(bottom=0, top=max(5.0, ax.get_ylim()[1]))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_file(path, png.getvalue())
    return path


def draw_charts(report: Report, folder: Path) -> dict[str, Path]:
    """Every chart the report has data for, as numbered PNGs in `folder`.

    Args:
        report: the built report.
        folder: where the PNGs go; created if missing.

    Returns:
        The path of each chart drawn, by name (a key of CHART_TITLES), in the order the report shows them.
    """
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
    if any(report.val_curves.values()):
        chart = chart_loss_curves(
            report, report.val_curves, name="val_curves", ylabel="validation loss (val/loss, nats per target token)"
        )
        charts["val_curves"] = _save(chart, folder / "8_validation_curves.png")
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
        _percent_from_zero(ax, metric)
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
    from matplotlib.lines import Line2D  # lazy: as _figure's

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
        _percent_from_zero(ax, metric)
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
        else:
            _percent_from_zero(ax, metric)
    return fig


def chart_loss_curves(report: Report, curves: dict | None = None, *, name: str = "loss_curves", ylabel: str = ""):
    """train/loss per step (or `curves`: another metric's history, such as val/loss), the mean over seeds, one panel
    per comparison (a configuration may be in several)."""
    from matplotlib.ticker import MaxNLocator  # lazy: as _figure's

    curves = report.loss_curves if curves is None else curves

    panels = [(f"{c.name} ({c.fixed})", [(c.value(x), x) for x in c.configurations]) for c in report.comparisons]
    placed = {x.key for c in report.comparisons for x in c.configurations}
    others = [(x.label, x) for x in report.configurations if x.key not in placed]
    if others or not panels:
        everyone = [(x.label, x) for x in report.configurations]
        panels.append(("other configurations" if panels else "every configuration", others or everyone))
    title = f"{CHART_TITLES[name]}: mean over seeds, band from the lowest to the highest seed"
    fig, axes = _figure(len(panels), title, width=5.2)
    for ax, (panel_title, members) in zip(axes, panels, strict=True):
        for name, config in members:
            by_step: dict[int, list[float]] = defaultdict(list)
            for r in config.runs:
                for step, value in curves.get(r.run_id, []):
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
        ax.set_ylabel(ylabel or "training loss (nats per target token)")
        ax.legend(fontsize=8)
    return fig


def chart_speed_memory(configs: list[Configuration], number: dict[str, int]):
    """Training speed against peak memory, one numbered point per configuration, with both intervals."""
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
    """The memory planner's prediction against the measured peak, one point per run, coloured by storage."""
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
