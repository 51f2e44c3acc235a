"""The report's statistics, pure (no MLflow, no runs): a metric over seeds, the difference of two against the
noise, how a mean and its interval are written, and the Pareto front of points.

A configuration's metric over n seeds: mean, sample standard deviation and the 95 % interval of the mean from
Student's t with n - 1 degrees of freedom (with 2 seeds t = 12.71, so intervals are wide). Two configurations
differ by more than the noise when the 95 % interval of the difference of their means (Welch, unequal variances)
excludes zero, which is Welch's t-test at the 5 % level. The base model alone is evaluated once and
deterministically, so it is compared as a constant. Only seed-to-seed noise is counted: exact match over 30
examples also has sampling noise that the seeds do not show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_efficiency.report.metrics import METRICS


def t_quantile(df: float) -> float:
    """Two-sided 95 % quantile of Student's t."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class Stat:
    """One metric of one configuration over its seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float | None:
        if self.n < 2:
            return None
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (self.n - 1))

    @property
    def half_width(self) -> float | None:
        """Half the 95 % interval of the mean; None with one seed."""
        return None if self.std is None else t_quantile(self.n - 1) * self.std / math.sqrt(self.n)

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def cell(stat: Stat | None, metric: str) -> str:
    """'3.210 [3.160, 3.260]' (mean [95 % interval]); one value when every seed agrees; 'x (1 seed)'.

    Args:
        stat: the metric over seeds, or None when no seed measured it.
        metric: the metric's name, a key of METRICS (how its values are written).

    Returns:
        The text of one table cell.
    """
    spec = METRICS[metric]
    if stat is None:
        return "not measured"
    if stat.n == 1:
        return f"{spec.show(stat.mean)} (1 seed)"
    if len(set(stat.values)) == 1:
        return spec.show(stat.mean)
    return f"{spec.show(stat.mean)} [{spec.show(stat.low)}, {spec.show(stat.high)}]"


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) of one metric, its Welch 95 % interval, and whether that excludes zero."""

    metric: str
    diff: float | None
    low: float | None
    high: float | None
    reference_mean: float | None
    verdict: str  # "larger than noise", "within noise", "no difference", "cannot tell (...)" or "not measured"

    @property
    def decided(self) -> bool:
        return self.verdict in ("larger than noise", "within noise", "no difference")

    @property
    def within_noise(self) -> bool:
        return self.verdict in ("within noise", "no difference")

    def text(self) -> str:
        """perplexity -0.8% (interval -3.1% to +1.5%), within noise."""
        spec = METRICS[self.metric]
        if self.diff is None:
            return f"{spec.label} not measured"
        if spec.fraction:
            size = f"{self.diff * 100:+.1f} points"
            interval = None if self.low is None else f"{self.low * 100:+.1f} to {self.high * 100:+.1f}"
        else:
            scale = 100 / abs(self.reference_mean) if self.reference_mean else float("nan")
            size = f"{self.diff * scale:+.1f}%"
            interval = None if self.low is None else f"{self.low * scale:+.1f}% to {self.high * scale:+.1f}%"
        interval = f" (interval {interval})" if interval else ""
        return f"{spec.label} {size}{interval}, {self.verdict}"


def difference(a: Stat | None, b: Stat | None, *, metric: str, b_exact: bool = False) -> Difference:
    """a - b, with Welch's 95 % interval and the verdict against the seed-to-seed noise.

    Args:
        a: the metric over the seeds of one configuration, or None when not measured.
        b: the same for the configuration it is compared with.
        metric: the metric's name, a key of METRICS.
        b_exact: b is a constant (the base model, evaluated once and deterministically), not a mean.

    Returns:
        The difference; its verdict says whether the interval excludes zero, or why that cannot be told.
    """
    if a is None or b is None:
        return Difference(metric, None, None, None, None, "not measured")
    diff = a.mean - b.mean
    if a.n < 2 or (b.n < 2 and not b_exact):
        return Difference(metric, diff, None, None, b.mean, "cannot tell (one seed)")
    var_a = a.std**2 / a.n
    var_b = 0.0 if b_exact else b.std**2 / b.n
    se = math.sqrt(var_a + var_b)
    if se == 0:  # every seed measured the same (1 of 30 answers right, twice): the noise is not measured
        verdict = "no difference" if diff == 0 else "cannot tell (the seeds agree exactly: no noise estimate)"
        return Difference(metric, diff, None, None, b.mean, verdict)
    parts = [var_a**2 / (a.n - 1)] + ([] if b_exact else [var_b**2 / (b.n - 1)])
    df = (var_a + var_b) ** 2 / sum(parts)  # Welch-Satterthwaite
    half = t_quantile(df) * se
    low, high = diff - half, diff + half
    verdict = "larger than noise" if low > 0 or high < 0 else "within noise"
    return Difference(metric, diff, low, high, b.mean, verdict)


def pareto_front(points: list[tuple[float, float]], *, higher_is_better: bool) -> list[int]:
    """Indices of the points that no other point beats: less or equal cost (x, lower is better) and better or
    equal quality (y), better in one of them. Sorted by cost."""
    sign = -1 if higher_is_better else 1
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and sign * y2 <= sign * y) and (x2 < x or sign * y2 < sign * y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])
