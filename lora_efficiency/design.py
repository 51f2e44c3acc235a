"""A study's design before its data: the contrasts it declares (which configuration against which, equivalence
within a margin or a difference of at least one, on which metric) and the seeds each needs for 80 % power.

    contrasts = parse_contrasts(load_profile("standard").get("contrasts"))
    seeds_needed(sd=0.0148, margin=0.02, test="equivalence", k=len(contrasts))    # 9 with Holm over three

Power of a paired log-ratio contrast. d_i = ln(metric of a) - ln(metric of b) for seed i (for perplexity: the
difference of eval loss), n seeds, paired sd s, so the mean d has standard error s / sqrt(n) and the tests use
Student's t with n - 1 degrees of freedom; the margin m is a ratio (0.02: +/-2 %), delta = ln(1 + m) on the log
scale. Holm over k declared contrasts is planned at its most conservative step, alpha / k (Bonferroni): the power a
plan states is then a lower bound for every contrast.

- equivalence (TOST at alpha: two one-sided t-tests, equivalently the (1 - 2 alpha) interval inside +/-delta):
  it decides when mean d lies in (-delta + t se_hat, delta - t se_hat), where se_hat is estimated from the same seeds
  (s_hat^2 ~ s^2 chi2(n-1) / (n-1), independent of mean d). Its power is the exact integral over chi2 of the normal
  probability of that interval (Owen's Q, computed by quadrature), not the two-noncentral-t approximation, which
  reads 0 at n = 3 where the exact power is 0.26.
- difference (two-sided t-test at alpha): the power is P(|T| > t(1 - alpha/2, n-1)) for T noncentral t with
  noncentrality theta / (s / sqrt(n)), theta = ln(true ratio); planned at a true effect of the margin's size.

Checked against the issue's arithmetic (tests/unit/test_design.py): s = 0.0148, +/-2 %, 3 seeds: 0.26; 7 seeds give
0.86 (>= 0.8) for one equivalence contrast, 9 give 0.80 with Holm over three; 3 seeds already detect a 5 %
difference. An evaluation-noise floor (the same examples scored for every seed: their sampling noise does not shrink
with seeds) enters as a standard error added in quadrature, se(n)^2 = s^2 / n + floor^2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from scipy import integrate, stats

from lora_efficiency.errors import ConfigError, invalid

EQUIVALENCE, DIFFERENCE = "equivalence", "difference"
TESTS = (EQUIVALENCE, DIFFERENCE)
DEFAULT_METRIC = "eval/perplexity"
# Ratio metrics a contrast may name (the report compares them on the log scale).
CONTRAST_METRICS = ("eval/perplexity", "memory/peak_mb", "perf/train_tokens_per_second", "time/train_s")
CONTRAST_KEYS = ("name", "a", "b", "test", "margin", "metric")
MAX_SEEDS = 1000  # seeds_needed's search stops here: beyond it no study of this project would run


@dataclass(frozen=True)
class Contrast:
    """One declared contrast: configuration `a` against `b`, each given by the settings that pick it (the others
    are the profile's defaults)."""

    name: str
    a: dict[str, str]
    b: dict[str, str]
    test: str  # EQUIVALENCE or DIFFERENCE
    margin: float  # a ratio: 0.02 is within +/-2 % (equivalence), or a difference of at least 2 %
    metric: str = DEFAULT_METRIC
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def delta(self) -> float:
        """The margin on the log scale, ln(1 + margin)."""
        return math.log1p(self.margin)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "a": self.a, "b": self.b, "test": self.test, "margin": self.margin,
                "metric": self.metric}  # fmt: skip

    def describe(self) -> str:
        """'equivalence within ±2%' or 'a difference of at least 5%'."""
        size = f"{self.margin * 100:.3g}%"
        return f"equivalence within ±{size}" if self.test == EQUIVALENCE else f"a difference of at least {size}"


def _settings(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict) or not value or not all(isinstance(k, str) for k in value):
        return None
    if not all(isinstance(v, str | int | float | bool) for v in value.values()):
        return None
    return {k: str(v) for k, v in value.items()}


def parse_contrasts(raw: Any, *, where: str = "profile", settings: tuple[str, ...] = ()) -> list[Contrast]:
    """The `contrasts` list of a profile, every problem collected and raised once (ConfigError: exit 2).

    Args:
        raw: the YAML value; None or missing: no contrasts.
        where: names the file in each problem.
        settings: the setting names a/b may use (empty: any).

    Returns:
        The contrasts, in the order declared.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError([invalid(f"{where}: contrasts", raw, "a list of {name, a, b, test, margin[, metric]}")])
    problems, out, names = [], [], set()
    for i, item in enumerate(raw):
        at = f"{where}: contrasts[{i}]"
        if not isinstance(item, dict):
            problems.append(invalid(at, item, "a mapping with name, a, b, test, margin and optionally metric"))
            continue
        if unknown := sorted(set(map(str, item)) - set(CONTRAST_KEYS)):
            problems.append(invalid(f"{at}.{unknown[0]}", item[unknown[0]], f"one of {', '.join(CONTRAST_KEYS)}"))
        name = item.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 100 or name in names:
            problems.append(invalid(f"{at}.name", name, "a unique non-empty text of at most 100 characters"))
        names.add(name)
        sides = {}
        for side in ("a", "b"):
            sides[side] = _settings(item.get(side))
            if sides[side] is None:
                problems.append(invalid(f"{at}.{side}", item.get(side), "a mapping of settings, e.g. {rank: 4}"))
            elif settings and (bad := sorted(set(sides[side]) - set(settings))):
                problems.append(
                    invalid(f"{at}.{side}.{bad[0]}", sides[side][bad[0]], f"a setting: {', '.join(settings)}")
                )
        if sides["a"] is not None and sides["a"] == sides["b"]:
            problems.append(invalid(f"{at}.b", item.get("b"), "settings that differ from a's"))
        test = item.get("test")
        if test not in TESTS:
            problems.append(invalid(f"{at}.test", test, f"one of {', '.join(TESTS)}"))
        margin = item.get("margin")
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 < margin < 1:
            problems.append(invalid(f"{at}.margin", margin, "a ratio in (0, 1): 0.02 is +/-2 %"))
        metric = item.get("metric", DEFAULT_METRIC)
        if metric not in CONTRAST_METRICS:
            problems.append(invalid(f"{at}.metric", metric, f"one of {', '.join(CONTRAST_METRICS)}"))
        if not problems:
            out.append(Contrast(name, sides["a"], sides["b"], test, float(margin), metric))
    if problems:
        raise ConfigError(problems)
    return out


# ---------------------------------------------------------------------------------------------------------
# Power


def contrast_power(
    sd: float,
    n: int,
    margin: float,
    test: str,
    *,
    k: int = 1,
    alpha: float = 0.05,
    true_ratio: float | None = None,
    floor: float = 0.0,
) -> float:
    """The power of one paired log-ratio contrast over n seeds, at level alpha / k (Holm over k, planned at its
    most conservative step).

    Args:
        sd: the paired standard deviation of ln-metric differences per seed.
        n: seeds (pairs).
        margin: the contrast's margin as a ratio (0.02: 2 %).
        test: EQUIVALENCE or DIFFERENCE.
        k: the number of contrasts in the Holm family.
        alpha: the family's level.
        true_ratio: the ratio a / b assumed true; None: 1 for equivalence, 1 + margin for a difference.
        floor: a standard error that seeds do not reduce (the evaluation examples' sampling noise).

    Returns:
        The probability that the test decides (equivalent / different), in [0, 1].
    """
    if n < 2:
        return 0.0
    level, df = alpha / k, n - 1
    theta = math.log(true_ratio if true_ratio is not None else (1.0 if test == EQUIVALENCE else 1 + margin))
    se_true = math.sqrt(sd**2 / n + floor**2)
    if se_true == 0:
        return 1.0
    # s_hat^2 = sd^2 c / df with c ~ chi2(df), independent of mean d: integrate over c where its density lives
    # (quantiles 1e-12 to 1 - 1e-12: quad misses a narrow peak on an unbounded range, and df = 999 is narrow)
    c_low, c_high = stats.chi2.ppf(1e-12, df), stats.chi2.ppf(1 - 1e-12, df)
    if test == DIFFERENCE:
        t = stats.t.ppf(1 - level / 2, df)

        def reject(c: float) -> float:
            se = math.sqrt(sd**2 * c / df / n + floor**2)
            two_sided = stats.norm.sf((t * se - theta) / se_true) + stats.norm.cdf((-t * se - theta) / se_true)
            return two_sided * stats.chi2.pdf(c, df)

        if sd == 0:
            return float(reject(df) / stats.chi2.pdf(df, df))
        return float(min(1.0, integrate.quad(reject, c_low, c_high, limit=200)[0]))
    delta, t = math.log1p(margin), stats.t.ppf(1 - level, df)

    def inside(c: float) -> float:  # P(mean d inside the TOST's acceptance band | s_hat^2 = sd^2 c / df)
        se = math.sqrt(sd**2 * c / df / n + floor**2)
        low, high = -delta + t * se, delta - t * se
        if high <= low:
            return 0.0
        band = stats.norm.cdf((high - theta) / se_true) - stats.norm.cdf((low - theta) / se_true)
        return band * stats.chi2.pdf(c, df)

    if sd == 0:  # no seed noise: the band is fixed by the floor alone
        return float(inside(df) / stats.chi2.pdf(df, df))
    # the band closes where t se >= delta: no chi2 mass beyond that point decides
    top = min(c_high, df * n * max(0.0, (delta / t) ** 2 - floor**2) / sd**2)
    return float(min(1.0, integrate.quad(inside, c_low, top, limit=200)[0])) if top > c_low else 0.0


def seeds_needed(
    sd: float,
    margin: float,
    test: str,
    k: int = 1,
    power: float = 0.8,
    *,
    true_ratio: float | None = None,
    alpha: float = 0.05,
    floor: float = 0.0,
) -> int | None:
    """The fewest seeds (>= 2) whose power reaches `power_target` (see contrast_power); None when no number up to
    MAX_SEEDS does (a noise floor that seeds cannot reduce, or a true ratio outside the margin)."""

    def enough(n: int) -> bool:
        return contrast_power(sd, n, margin, test, k=k, alpha=alpha, true_ratio=true_ratio, floor=floor) >= power

    high = 2  # power grows with n: double until it is enough, then bisect for the first n that is
    while not enough(high):
        if high >= MAX_SEEDS:
            return None
        high = min(2 * high, MAX_SEEDS)
    low = max(2, high // 2)
    while low < high:
        mid = (low + high) // 2
        if enough(mid):
            high = mid
        else:
            low = mid + 1
    return low


# ---------------------------------------------------------------------------------------------------------
# Which configuration a contrast names


def _text(value: Any) -> str:
    """A setting as runs log it (params are text): 4 -> '4', True -> 'True'; a YAML `true` and a logged 'true' match."""
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        return str(value).lower()
    try:  # a YAML `alpha: 32` and a logged '32.0' are one value
        return repr(float(str(value)))
    except ValueError:
        return str(value)


def matches(side: dict[str, str], settings: dict[str, Any]) -> bool:
    """Whether a configuration's settings have every value a contrast's side lists."""
    return all(k in settings and _text(settings[k]) == _text(v) for k, v in side.items())


def pick(side: dict[str, str], candidates: list[dict[str, Any]], defaults: dict[str, Any]) -> int | None:
    """The index of the configuration a contrast's side names: it has the listed settings, and of those that do,
    the one with the most other settings at the profile's defaults (the others "as the profile's defaults"); None
    when none matches."""
    found = [i for i, s in enumerate(candidates) if matches(side, s)]
    if not found:
        return None

    def at_defaults(i: int) -> int:
        s = candidates[i]
        return sum(k in s and _text(s[k]) == _text(v) for k, v in defaults.items() if k not in side)

    return max(found, key=at_defaults)


def contrasts_json(contrasts: list[Contrast]) -> str:
    """The study run's `study_contrasts` tag: what the report reads back (the profile may change later)."""
    return json.dumps([c.as_dict() for c in contrasts], sort_keys=True)


def contrasts_from_json(text: str) -> list[Contrast]:
    return parse_contrasts(json.loads(text), where="tag study_contrasts") if text else []
