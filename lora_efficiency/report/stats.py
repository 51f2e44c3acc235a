"""The report's statistics, pure (no MLflow, no runs): a metric over seeds, the effect of one configuration
against another, the equivalence test against a declared margin, the Holm correction of a report's tests, how a
mean and its interval are written, and the Pareto front of points.

A configuration's metric over n seeds: mean, sample standard deviation and the 95 % interval of the mean from
Student's t with n - 1 degrees of freedom (with 2 seeds t = 12.71, so intervals are wide).

Two configurations are compared **paired by seed**: runs with the same seed saw the same batches, so the
difference is taken seed by seed (d_i = a_i - b_i over the seeds both have) and its mean gets a t interval with
n - 1 degrees of freedom; fewer than 2 seeds in common give no interval. Ratio metrics (perplexity, memory,
speed, time) are compared on the **log scale**: for perplexity d_i is the difference of eval loss
(ln perplexity), the effect is the ratio exp(mean d) and its interval exp(interval of mean d), which is a valid
interval for the ratio (not the difference's interval divided by a mean). Fractions (exact match) are compared
as differences in points. Where runs cannot be paired the test is unpaired and says so: against the base model
alone (one deterministic evaluation, a constant: one-sample t) and, for configurations without a seed in common,
Welch's t (unequal variances).

Each comparison carries two p-values: the two-sided t-test of no difference and, where a margin is declared
(perplexity: a ratio such as 1.02, log margin delta = ln 1.02), the equivalence test TOST (two one-sided t-tests
of d <= -delta and d >= delta; its p is the larger of the two, and it rejects at alpha exactly when the
(1 - 2 alpha) interval of d lies inside (-delta, +delta)). The p-values of a report form two families, one per
kind of test, each corrected with Holm-Bonferroni (Family). Where the study declared contrasts before its data
(lora_efficiency.design), their tests alone (one each) form the confirmatory family and every other test is
exploratory, corrected among themselves. The verdicts mean what they say: "better" / "worse" (no difference rejected
after Holm), "equivalent within +-X%" (TOST rejected after Holm), else "cannot tell", which also says how many
seeds would decide it at the observed spread; "not detected" is never read as "equal".

Perplexity counts both noises where the runs logged their per-example losses: the seeds' (t over the paired
differences) and the sampling of the evaluation examples (a bootstrap of example ids: example_noise), added in
quadrature (with_example_noise). Other metrics count the seeds' alone: exact match over 30 examples also has
sampling noise that the seeds do not show.

Student's t distribution comes from scipy.stats.t (scipy is a dependency of the project's environment).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
from scipy.stats import t

from lora_efficiency.design import DIFFERENCE, EQUIVALENCE, MAX_SEEDS, seeds_needed
from lora_efficiency.report.metrics import METRICS

PAIRED = "paired by seed"
CONSTANT = "unpaired: against a constant (one deterministic evaluation, no seeds)"
WELCH = "unpaired (Welch): no seed in common"
BETTER, WORSE, EQUIVALENT, CANNOT_TELL = "better", "worse", "equivalent", "cannot tell"


def t_quantile(df: float, q: float = 0.975) -> float:
    """The q quantile of Student's t with df degrees of freedom (0.975: the two-sided 95 % quantile)."""
    return float(t.ppf(q, df))


def t_sf(x: float, df: float) -> float:
    """P(T > x) for Student's t with df degrees of freedom."""
    return float(t.sf(x, df))


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


def log_scale(metric: str) -> bool:
    """Ratio metrics (positive amounts: perplexity, memory, speed, time) are compared on the log scale; fractions
    (exact match) as differences in points."""
    return not METRICS[metric].fraction


@dataclass(frozen=True)
class Effect:
    """a - b of one metric on its analysis scale (the log for ratio metrics), before any correction.

    design is PAIRED, CONSTANT or WELCH, "" when nothing could be tested (reason says why); n is the number of
    pairs (paired), of a's runs (against a constant) or of both's runs (Welch). delta is the equivalence margin on
    the analysis scale (ln of the perplexity margin), None where no margin is declared (no equivalence test).
    """

    metric: str
    design: str
    n: int
    diff: float | None
    se: float | None = None
    df: float | None = None
    delta: float | None = None
    reason: str = ""
    seed_sd: float | None = None  # the paired sd of the per-seed differences (what more seeds average away)
    example_se: float = 0.0  # the evaluation examples' sampling noise in `se`, which more seeds do not reduce
    noise: str = "seeds"  # what `se` counts: "seeds", "seeds and examples", or "seeds only (why)"

    @property
    def tested(self) -> bool:
        return self.se is not None

    def interval(self, level: float) -> tuple[float, float] | None:
        """The `level` interval of the difference (0.95: diff +- t(0.975, df) se); None when not tested."""
        if not self.tested:
            return None
        half = t_quantile(self.df, 1 - (1 - level) / 2) * self.se
        return self.diff - half, self.diff + half

    @property
    def p_difference(self) -> float | None:
        """Two-sided p of 'no difference'."""
        return None if not self.tested else 2 * t_sf(abs(self.diff) / self.se, self.df)

    @property
    def p_equivalence(self) -> float | None:
        """TOST: the larger p of the one-sided tests of diff <= -delta and diff >= +delta; None without a margin."""
        if not self.tested or self.delta is None:
            return None
        return max(t_sf((self.diff + self.delta) / self.se, self.df), t_sf((self.delta - self.diff) / self.se, self.df))


def effect(a: dict[int, float], b: dict[int, float] | float, *, metric: str, delta: float | None = None) -> Effect:
    """a - b of one metric, paired by seed where the seeds allow.

    Args:
        a: the metric of one configuration, by seed.
        b: the same for the configuration it is compared with; a float: a constant (the base model alone,
            evaluated once and deterministically), compared by a one-sample t-test.
        metric: the metric's name, a key of METRICS (its scale).
        delta: the equivalence margin on the analysis scale; None: no equivalence test.

    Returns:
        The effect, paired over the seeds both have when there are 2 or more; unpaired (Welch) when they have no
        seed in common and 2 runs each; else untested, with the reason.
    """
    constant = isinstance(b, float | int)
    if not a or (not constant and not b):
        return Effect(metric, "", 0, None, reason="not measured")
    values = [*a.values(), *([b] if constant else b.values())]
    if log_scale(metric) and min(values) <= 0:
        return Effect(metric, "", 0, None, reason="a value <= 0 has no log")
    f = math.log if log_scale(metric) else float
    if constant:
        return _one_sample([f(v) - f(b) for v in a.values()], metric, CONSTANT, delta)
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        return _one_sample([f(a[s]) - f(b[s]) for s in common], metric, PAIRED, delta)
    if not common and len(a) >= 2 and len(b) >= 2:
        return welch([f(v) for v in a.values()], [f(v) for v in b.values()], metric=metric, delta=delta)
    diff = _mean([f(v) for v in a.values()]) - _mean([f(v) for v in b.values()])
    reason = "one seed" if min(len(a), len(b)) < 2 else "fewer than 2 seeds in common"
    return Effect(metric, "", len(common), diff, delta=delta, reason=reason)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _variance(xs: list[float]) -> float:
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def _no_noise(var: float, xs: list[float]) -> bool:
    """A variance that is zero but for float rounding (0.1 - 0.3 and 0.2 - 0.4 differ in the 17th digit): the
    seeds show no noise, so no test can be made."""
    return math.sqrt(var) <= 1e-9 * max(abs(x) for x in xs)


def _one_sample(ds: list[float], metric: str, design: str, delta: float | None) -> Effect:
    """The mean of ds with its t standard error (n - 1 degrees of freedom): paired differences or differences from
    a constant."""
    n, diff = len(ds), _mean(ds)
    if n < 2:
        return Effect(metric, "", n, diff, delta=delta, reason="one seed")
    var = _variance(ds)
    if _no_noise(var, ds):  # every seed moved by the same amount (1 of 30 answers right, twice): no noise estimate
        return Effect(metric, "", n, diff, delta=delta, reason="the seeds agree exactly: no noise estimate")
    return Effect(metric, design, n, diff, math.sqrt(var / n), n - 1, delta, seed_sd=math.sqrt(var))


def welch(a: list[float], b: list[float], *, metric: str, delta: float | None = None) -> Effect:
    """mean(a) - mean(b) of independent samples (already on the analysis scale), Welch's standard error and the
    Welch-Satterthwaite degrees of freedom: the test for runs that cannot be paired."""
    diff = _mean(a) - _mean(b)
    if len(a) < 2 or len(b) < 2:
        return Effect(metric, "", len(a) + len(b), diff, delta=delta, reason="one seed")
    var_a, var_b = _variance(a) / len(a), _variance(b) / len(b)
    if _no_noise(var_a + var_b, a + b):
        return Effect(
            metric, "", len(a) + len(b), diff, delta=delta, reason="the seeds agree exactly: no noise estimate"
        )
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return Effect(metric, WELCH, len(a) + len(b), diff, math.sqrt(var_a + var_b), df, delta)


# The evaluation examples' sampling noise (two stages: seeds by Student's t, examples by a bootstrap). Every run
# scores the same held-out examples, so their sampling noise is shared by all seeds (crossed, not nested): more seeds
# do not average it away, and the paired t over seeds cannot see it. Its variance is estimated by resampling example
# ids (one resample for every seed, paired across a and b by id) and added to the seeds' s^2 / n; the degrees of
# freedom follow Welch-Satterthwaite. The seed stage is not bootstrapped: 3 seeds give 10 distinct resamples, and a
# percentile interval from them covers about 75 % where it claims 95 % (a bootstrap se is s sqrt((n-1)/n) / sqrt(n),
# read against 1.96 instead of t(0.975, 2) = 4.30).
# 2,000 replicates: the Monte-Carlo error of a variance from B replicates is sqrt(2 / (B - 1)) of it, 3.2 % at 2,000,
# so 1.6 % on the standard error; a fixed generator seed makes every report of the same runs identical.
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 28


def _examples(table: dict[str, list], task: str | None) -> dict[object, tuple[float, float]]:
    """example id -> (tokens, mean loss) of the examples a run scored (with a loss), of one task family or all."""
    tasks = table.get("task") or [""] * len(table["example"])
    return {
        ex: (float(n), float(loss))
        for ex, t, n, loss in zip(table["example"], tasks, table["tokens"], table["loss"], strict=True)
        if loss is not None and n and (task is None or t == task)
    }


def example_noise(
    pairs: list[tuple[dict[str, list], dict[str, list]]],
    *,
    task: str | None = None,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, int] | None:
    """The standard error that the sampling of evaluation examples adds to the mean paired difference of eval loss.

    Args:
        pairs: per seed, the per-example losses of a and of b (per_example_losses.json: example, task, tokens, loss).
        task: one task family's examples only; None: all.
        replicates: bootstrap replicates.
        seed: the generator's seed (deterministic).

    Returns:
        (the bootstrap standard error of mean_i [loss_a,i - loss_b,i], each loss token-weighted over the resampled
        examples, the number of examples), or None with fewer than 2 examples scored in every table.
    """
    tables = [(_examples(a, task), _examples(b, task)) for a, b in pairs]
    ids = sorted(set.intersection(*(set(a) & set(b) for a, b in tables)), key=str) if tables else []
    m = len(ids)
    if m < 2:
        return None
    counts = np.random.default_rng(seed).multinomial(m, np.full(m, 1 / m), size=replicates).astype(float)
    total = np.zeros(replicates)
    for a, b in tables:
        for side, sign in ((a, 1.0), (b, -1.0)):
            tokens = np.array([side[i][0] for i in ids])
            losses = np.array([side[i][1] for i in ids])
            total += sign * (counts @ (tokens * losses)) / (counts @ tokens)
    return float(np.std(total / len(tables), ddof=1)), m


def with_example_noise(
    ds: list[float], example_se: float, examples: int, *, metric: str, delta: float | None = None
) -> Effect:
    """The mean of paired differences ds with both noises: se^2 = s^2 / n (seeds) + example_se^2 (examples), and
    Welch-Satterthwaite degrees of freedom from n - 1 and examples - 1."""
    n, diff = len(ds), _mean(ds)
    noise = f"seeds and {examples} examples"
    if n < 2:
        return Effect(metric, "", n, diff, delta=delta, reason="one seed", noise=noise)
    seed_var = _variance(ds) / n
    if _no_noise(seed_var, ds):
        seed_var = 0.0
    var = seed_var + example_se**2
    if var == 0 or _no_noise(var, ds):
        return Effect(metric, "", n, diff, delta=delta, reason="no noise in seeds or examples", noise=noise)
    df = var**2 / (seed_var**2 / (n - 1) + example_se**4 / (examples - 1))
    return Effect(
        metric, PAIRED, n, diff, math.sqrt(var), df, delta, seed_sd=math.sqrt(seed_var * n), example_se=example_se,
        noise=noise,
    )  # fmt: skip


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given: the i-th smallest of m is multiplied by m - i + 1,
    then made non-decreasing in that order and capped at 1. A test rejects at alpha when its adjusted p < alpha."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def margin_text(margin: float) -> str:
    """1.02 -> '±2%'."""
    return f"±{(margin - 1) * 100:.3g}%"


@dataclass(frozen=True)
class Judgement:
    """An effect judged within its report: the p-values adjusted by Holm over the report's family, the verdict.

    `verdict` is "better" / "worse" (a differs from b beyond noise after Holm, in that direction), "equivalent
    within ±X%" (TOST after Holm), "cannot tell" otherwise, or "not measured". A difference that is real but
    smaller than the margin is both: its verdict is "equivalent" and `beyond_noise` stays True.
    """

    effect: Effect
    alpha: float
    margin: float | None  # the declared perplexity ratio where an equivalence test ran, else None
    p_difference: float | None  # Holm-adjusted
    p_equivalence: float | None  # Holm-adjusted
    declared: str = ""  # the contrast's name where the study declared this test before its data, else ""
    exploratory: bool = False  # outside the declared family (a study declared contrasts, this is not one)
    holm_size: int = 1  # the tests in this one's Holm family: what seeds_to_decide plans for

    @property
    def beyond_noise(self) -> bool:
        return self.p_difference is not None and self.p_difference < self.alpha

    @property
    def equivalent(self) -> bool:
        return self.p_equivalence is not None and self.p_equivalence < self.alpha

    @property
    def improves(self) -> bool:
        """a is better than b at the point estimate (lower perplexity, higher exact match...)."""
        d = self.effect.diff or 0.0
        return d > 0 if METRICS[self.effect.metric].higher_is_better else d < 0

    @property
    def verdict(self) -> str:
        if self.effect.diff is None:
            return "not measured"
        if self.equivalent:
            return f"{EQUIVALENT} within {margin_text(self.margin)}"
        if self.beyond_noise:
            return BETTER if self.improves else WORSE
        return CANNOT_TELL

    @property
    def ratio(self) -> tuple[float, float | None, float | None] | None:
        """exp(diff) and exp of the (1 - alpha) interval of diff: the ratio a / b (geometric means) and its
        interval; None for a metric compared in points."""
        if not log_scale(self.effect.metric) or self.effect.diff is None:
            return None
        interval = self.effect.interval(1 - self.alpha)
        low, high = (math.exp(interval[0]), math.exp(interval[1])) if interval else (None, None)
        return math.exp(self.effect.diff), low, high

    def seeds_to_decide(self) -> tuple[int | None, str] | None:
        """For a "cannot tell" paired test: the seeds that would decide it with 80 % power at the observed spread
        (the paired sd of its seeds; the examples' noise as a floor seeds do not reduce), planned at alpha / k for
        its Holm family of k, and what they would decide; None where no such number applies (decided, unpaired,
        untested, no margin)."""
        e = self.effect
        if self.verdict != CANNOT_TELL or e.design != PAIRED or e.seed_sd is None or self.margin is None:
            return None
        m = self.margin - 1
        test = EQUIVALENCE if self.p_equivalence is not None else DIFFERENCE
        n = seeds_needed(e.seed_sd, m, test, self.holm_size, alpha=self.alpha, floor=e.example_se)
        what = (
            f"equivalence within {margin_text(self.margin)}"
            if test == EQUIVALENCE
            else (f"a difference of {m * 100:.3g}%")
        )
        return n, what

    @cached_property
    def decision(self) -> str:
        """The verdict, and for "cannot tell" how many seeds would decide it: 'cannot tell; ~12 seeds would decide
        equivalence within ±2%'."""
        advice = self.seeds_to_decide()
        if advice is None:
            return self.verdict
        n, what = advice
        if n is None and self.effect.example_se:
            why = "the evaluation examples' noise is too large (more examples would)"
            return f"{self.verdict}; no number of seeds would decide {what}: {why}"
        if n is None:
            return f"{self.verdict}; more than {MAX_SEEDS} seeds would be needed to decide {what}"
        return f"{self.verdict}; ~{n} seeds would decide {what}"

    def reversed(self) -> Judgement:
        """The same test read as b - a: the same p-values, the difference negated."""
        diff = None if self.effect.diff is None else -self.effect.diff
        return replace(self, effect=replace(self.effect, diff=diff))

    def size(self) -> str:
        """'ratio 0.994 [0.989, 0.999]' (log-scale metrics) or '+20.0 points [+5.0, +35.0]' (fractions): the
        (1 - alpha) interval; where an equivalence test ran, also the (1 - 2 alpha) interval its TOST decides on
        ('ratio 0.994, 95% [0.989, 0.999], 90% [0.990, 0.998]'): equivalent exactly when that one lies inside the margin
        (before Holm)."""
        e = self.effect
        if self.ratio is not None:
            r, low, high = self.ratio
            tost = e.interval(1 - 2 * self.alpha) if e.delta is not None else None
            if tost is None:
                return f"ratio {r:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")
            level = round(100 * (1 - self.alpha))
            return (
                f"ratio {r:.3f}, {level}% [{low:.3f}, {high:.3f}], "
                f"{round(100 * (1 - 2 * self.alpha))}% [{math.exp(tost[0]):.3f}, {math.exp(tost[1]):.3f}]"
            )
        interval = e.interval(1 - self.alpha)
        return f"{e.diff * 100 + 0.0:+.1f} points" + (
            "" if interval is None else f" [{interval[0] * 100:+.1f}, {interval[1] * 100:+.1f}]"
        )

    def text(self) -> str:
        """'perplexity ratio 0.994 [0.989, 0.999] (3 pairs by seed; Holm p = 0.012, equivalence Holm p = 0.003):
        equivalent within ±2%'."""
        e, label = self.effect, METRICS[self.effect.metric].label
        if e.diff is None:
            return f"{label} not measured"
        if not e.tested:
            return f"{label} {self.size()}: {CANNOT_TELL} ({e.reason})"
        how = {PAIRED: f"{e.n} pairs by seed", CONSTANT: f"{e.n} seeds against one evaluation, unpaired"}.get(
            e.design, f"{e.n} runs, unpaired Welch: no seed in common"
        )
        if e.noise != "seeds":
            how += f", noise of {e.noise}"
        ps = ", ".join(
            f"{name}Holm {_p(p)}"
            for name, p in (("", self.p_difference), ("equivalence ", self.p_equivalence))
            if p is not None
        )
        ps = (
            f"declared contrast {self.declared!r}, {ps}"
            if self.declared
            else f"exploratory, {ps}"
            if (self.exploratory)
            else ps
        )
        both = f" ({'better' if self.improves else 'worse'} beyond noise, by less than the margin)"
        return f"{label} {self.size()} ({how}; {ps}): {self.decision}" + (
            both if self.equivalent and self.beyond_noise else ""
        )


class Family:
    """The tests one report states, corrected together: the tests of 'no difference' form one family and the
    equivalence tests (TOST) another; Holm-Bonferroni runs over each. Add every effect, close, then read the
    judgements by key; a key never added is an error (every verdict the report states is in its family)."""

    def __init__(self, *, alpha: float, margin: float):
        self.alpha, self.margin = alpha, margin
        self._effects: dict[Hashable, Effect] = {}
        self._declared: dict[Hashable, tuple[str, str, float]] = {}  # key -> (name, test, margin ratio)
        self._judged: dict[Hashable, Judgement] | None = None

    def declare(self, key: Hashable, eff: Effect, *, name: str, test: str, margin: float) -> None:
        """A contrast the study declared before its data: its one test (equivalence within `margin`, a ratio such as
        1.02, or difference) joins the declared family, which Holm corrects on its own; once any contrast is
        declared, every other test of the report is exploratory (corrected among themselves, outside it)."""
        if self._judged is not None:
            raise RuntimeError("the family is closed: its corrections are computed")
        if key not in self._declared:
            self._effects[key] = replace(eff, delta=math.log(margin) if test == "equivalence" else None)
            self._declared[key] = (name, test, margin)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._effects

    def add(self, key: Hashable, eff: Effect) -> None:
        """One test of the family (the first effect under a key counts: one comparison is one test)."""
        if self._judged is not None:
            raise RuntimeError("the family is closed: its corrections are computed")
        self._effects.setdefault(key, eff)

    def close(self) -> None:
        """Holm over each family: the declared contrasts' tests together (one test each), then the others' tests of
        'no difference' and their equivalence tests, each kind apart."""
        declared = {
            k: self._effects[k].p_equivalence if test == "equivalence" else self._effects[k].p_difference
            for k, (_, test, _) in self._declared.items()
        }
        declared = {k: p for k, p in declared.items() if p is not None}
        adjusted_declared = dict(zip(declared, holm(list(declared.values())), strict=True))
        others = {k: e for k, e in self._effects.items() if k not in self._declared}
        diff = {k: e.p_difference for k, e in others.items() if e.p_difference is not None}
        equiv = {k: e.p_equivalence for k, e in others.items() if e.p_equivalence is not None}
        adjusted_diff = dict(zip(diff, holm(list(diff.values())), strict=True))
        adjusted_equiv = dict(zip(equiv, holm(list(equiv.values())), strict=True))
        self._judged = {}
        for k, e in self._effects.items():
            if k in self._declared:
                name, test, margin = self._declared[k]
                p = adjusted_declared.get(k)
                ps = (None, p) if test == "equivalence" else (p, None)
                self._judged[k] = Judgement(e, self.alpha, margin, *ps, declared=name, holm_size=len(declared) or 1)
            else:
                size = len(equiv) if e.p_equivalence is not None else len(diff)
                self._judged[k] = Judgement(
                    e,
                    self.alpha,
                    math.exp(e.delta) if e.delta is not None else None,  # the margin it was tested at
                    adjusted_diff.get(k),
                    adjusted_equiv.get(k),
                    exploratory=bool(self._declared),
                    holm_size=max(size, 1),
                )

    def __getitem__(self, key: Hashable) -> Judgement:
        if self._judged is None:
            self.close()
        return self._judged[key]

    @property
    def declared_tests(self) -> int:
        return len(self._declared)

    @property
    def difference_tests(self) -> int:
        """The tests of 'no difference' outside the declared family."""
        return sum(e.p_difference is not None for k, e in self._effects.items() if k not in self._declared)

    @property
    def equivalence_tests(self) -> int:
        """The equivalence tests outside the declared family."""
        return sum(e.p_equivalence is not None for k, e in self._effects.items() if k not in self._declared)


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
