"""The report's intervals count the evaluation examples' sampling noise beside the seeds' (report/stats.py:
example_noise, with_example_noise), checked on constructed per-example losses whose variance components are known."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from lora_efficiency.report.stats import PAIRED, example_noise, with_example_noise

PERPLEXITY = "eval/perplexity"


def spread(n: int, sd: float) -> list[float]:
    """n fixed numbers of mean 0 and sample sd `sd` (evenly spaced): known, not random."""
    xs = [i - (n - 1) / 2 for i in range(n)]
    scale = sd / math.sqrt(sum(x * x for x in xs) / (n - 1))
    return [x * scale for x in xs]


def table(losses: list[float], tokens: list[int] | None = None) -> dict[str, list]:
    return {
        "example": list(range(len(losses))),
        "task": ["t"] * len(losses),
        "tokens": tokens or [1] * len(losses),
        "loss": losses,
    }


def pairs_for(seed_effects: list[float], example_effects: list[float]) -> tuple[list, list[float]]:
    """b's losses 1.0 everywhere; a's 1.0 + seed effect + example effect (crossed: the same example effect at
    every seed). Returns the per-seed tables and the per-seed differences of eval loss."""
    pairs, ds = [], []
    for s in seed_effects:
        a = [1.0 + s + e for e in example_effects]
        pairs.append((table(a), table([1.0] * len(a))))
        ds.append(sum(a) / len(a) - 1.0)
    return pairs, ds


def half_width(effect, level=0.95) -> float:
    low, high = effect.interval(level)
    return (high - low) / 2


def test_no_seed_noise_and_large_example_noise_gives_the_examples_interval():
    m, sd_e = 200, 0.5
    pairs, ds = pairs_for([0.01] * 5, spread(m, sd_e))
    se, examples = example_noise(pairs)
    assert examples == m
    e = with_example_noise(ds, se, examples, metric=PERPLEXITY)
    analytic = stats.t.ppf(0.975, m - 1) * sd_e / math.sqrt(m)  # the examples' mean, one sample of m
    assert e.design == PAIRED and half_width(e) == pytest.approx(analytic, rel=0.15)
    assert e.seed_sd == 0 and e.noise == "seeds and 200 examples"


def test_no_example_noise_gives_the_seed_only_t_interval():
    n, sd_s = 5, 0.02
    pairs, ds = pairs_for(spread(n, sd_s), [0.0] * 50)
    se, examples = example_noise(pairs)
    assert se == pytest.approx(0.0, abs=1e-12)
    e = with_example_noise(ds, se, examples, metric=PERPLEXITY)
    assert half_width(e) == pytest.approx(stats.t.ppf(0.975, n - 1) * sd_s / math.sqrt(n), rel=1e-6)


def test_both_noises_add_in_quadrature():
    n, m, sd_s, sd_e = 10, 200, 0.01, 0.3
    pairs, ds = pairs_for(spread(n, sd_s), spread(m, sd_e))
    e = with_example_noise(ds, *example_noise(pairs), metric=PERPLEXITY)
    assert e.se == pytest.approx(math.sqrt(sd_s**2 / n + sd_e**2 / m), rel=0.15)
    assert n - 1 < e.df <= (n - 1) + (m - 1)  # Welch-Satterthwaite: above the seeds' alone, below the sum


def test_the_bootstrap_is_deterministic_pairs_by_example_id_and_weights_by_tokens():
    pairs, _ = pairs_for([0.0, 0.01], spread(40, 0.2))
    assert example_noise(pairs) == example_noise(pairs)
    a, b = pairs[0]
    shuffled = {k: v[::-1] for k, v in b.items()}  # the same examples in another order: paired by id
    assert example_noise([(a, shuffled), pairs[1]]) == pytest.approx(example_noise(pairs), rel=1e-12)
    # one example of 1,000 tokens among 1-token ones dominates a token-weighted loss: more example noise
    heavy = {**a, "tokens": [1000] + [1] * 39}
    assert example_noise([(heavy, {**b, "tokens": heavy["tokens"]})])[0] > example_noise([(a, b)])[0]


def test_one_task_family_alone_and_examples_without_loss_are_left_out():
    a, b = table([1.5, 1.0, 2.0, None]), table([1.0, 1.0, 1.0, 1.0])
    a["task"] = b["task"] = ["x", "x", "y", "y"]
    assert example_noise([(a, b)], task="x")[1] == 2
    assert example_noise([(a, b)], task="y") is None  # one example with a loss: nothing to resample
