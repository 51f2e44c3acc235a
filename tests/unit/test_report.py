"""The report's arithmetic on toy runs: intervals, differences against the noise, Pareto front, comparisons,
budgets, anchors. Expected values are worked out by hand in the comments (t quantiles from tables)."""

from __future__ import annotations

import math

import pytest

from lora_efficiency.config import read_defaults
from lora_efficiency.report import (
    PERPLEXITY,
    RunData,
    Stat,
    budget_ladder,
    build_report,
    cell,
    check_anchors,
    difference,
    find_comparisons,
    group_configurations,
    pareto_front,
    recommend,
)
from tests.report_store import EXACT_MATCH, PEAK_MB, train_params
from tests.report_store import PERPLEXITY as KNOWN

T_2, T_4 = 4.302653, 2.776445  # Student's t, 97.5 % quantile, 2 and 4 degrees of freedom
DEFAULTS = read_defaults("train")


def run(name: str, seed: int, *, rank=16, quantization="nf4", modules="attention", resolved="q,k,v,o", **metrics):
    params = {k: str(v) for k, v in train_params(rank, quantization, seed).items()}
    params |= {"target_modules": modules, "target_modules_resolved": resolved}
    tags = {"config_hash": f"{rank}-{quantization}-{modules}", "sweep_key": f"{name}-{seed}", "seed": str(seed)}
    return RunData(f"{name}{seed}".ljust(32, "0"), f"{name}-s{seed}", "FINISHED", seed, params, metrics, tags)


def known_runs() -> list[RunData]:
    """The values of tests/report_store.py: r4, r8, r16 (nf4) and bf16, three seeds each."""
    settings = {"r4": (4, "nf4"), "r8": (8, "nf4"), "r16": (16, "nf4"), "bf16": (16, "bf16")}
    runs = []
    for name, (rank, quantization) in settings.items():
        for seed in range(3):
            metrics = {"eval/perplexity": KNOWN[name][seed], "memory/peak_mb": PEAK_MB[name][seed]}
            metrics["params/trainable"] = 115_200 * rank
            if name in EXACT_MATCH:
                metrics["eval/exact_match"] = EXACT_MATCH[name][seed]
            runs.append(run(name, seed, rank=rank, quantization=quantization, **metrics))
    return runs


def test_mean_sd_and_student_t_interval():
    st = Stat((4.0, 4.1, 4.2))
    assert st.mean == pytest.approx(4.1) and st.std == pytest.approx(0.1)
    half = T_2 * 0.1 / math.sqrt(3)  # 0.2484
    assert (st.low, st.high) == (pytest.approx(4.1 - half, abs=1e-5), pytest.approx(4.1 + half, abs=1e-5))
    assert cell(st, PERPLEXITY) == "4.100 [3.852, 4.348]"
    one = Stat((4.0,))
    assert one.std is None and one.low is None and cell(one, PERPLEXITY) == "4.000 (1 seed)"
    assert cell(None, PERPLEXITY) == "not measured"
    assert cell(Stat((0.2, 0.2)), "eval/exact_match") == "20.0"  # every seed the same: no interval to show


def test_welch_difference_inside_and_outside_the_noise():
    r8, r16, r4 = Stat((3.5, 3.6, 3.7)), Stat((3.52, 3.62, 3.72)), Stat((4.0, 4.1, 4.2))
    inside = difference(r8, r16, metric=PERPLEXITY)
    half = T_4 * math.sqrt(0.01 / 3 + 0.01 / 3)  # equal variances, n = 3 + 3: Welch's df is 4; 0.2267
    assert inside.diff == pytest.approx(-0.02)
    assert (inside.low, inside.high) == (pytest.approx(-0.02 - half, abs=1e-5), pytest.approx(-0.02 + half, abs=1e-5))
    assert inside.verdict == "within noise"
    assert inside.text() == "perplexity -0.6% (interval -6.8% to +5.7%), within noise"
    outside = difference(r4, r16, metric=PERPLEXITY)
    assert outside.verdict == "larger than noise" and outside.low > 0
    assert outside.text().startswith("perplexity +13.3% (interval +7.0% to +19.5%)")


def test_differences_that_cannot_be_decided():
    assert difference(Stat((3.5,)), Stat((3.6, 3.7)), metric=PERPLEXITY).verdict == "cannot tell (one seed)"
    assert difference(None, Stat((3.6, 3.7)), metric=PERPLEXITY).text() == "perplexity not measured"
    # 1 of 30 answers right with both seeds against 0 of 30: the seeds show no noise, so nothing is decided
    same = difference(Stat((1 / 30, 1 / 30)), Stat((0.0, 0.0)), metric="eval/exact_match")
    assert same.verdict.startswith("cannot tell") and not same.decided
    assert difference(Stat((0.1, 0.1)), Stat((0.1, 0.1)), metric="eval/exact_match").verdict == "no difference"
    points = difference(Stat((0.3, 0.4, 0.5)), Stat((0.1, 0.2, 0.3)), metric="eval/exact_match")
    assert points.text().startswith("exact match +20.0 points (interval ")


def test_a_constant_reference_uses_one_sample_t():
    d = difference(Stat((4.0, 4.1, 4.2)), Stat((4.0,)), metric=PERPLEXITY, b_exact=True)
    half = T_2 * 0.1 / math.sqrt(3)
    assert (d.low, d.high) == (pytest.approx(0.1 - half, abs=1e-5), pytest.approx(0.1 + half, abs=1e-5))
    assert d.verdict == "within noise"


def test_pareto_front():
    points = [(1000, 4.1), (1010, 3.6), (1020, 3.62), (1500, 3.57), (1500, 3.8), (900, 9.0)]
    assert pareto_front(points, higher_is_better=False) == [5, 0, 1, 3]
    assert pareto_front([(1, 0.1), (2, 0.3), (3, 0.2), (2, 0.3)], higher_is_better=True) == [0, 1, 3]


def test_configurations_group_by_config_hash_and_compare_along_each_axis():
    configs = group_configurations(known_runs())
    assert [c.label for c in configs] == [
        "r16 attention bf16",
        "r8 attention nf4",
        "r16 attention nf4",
        "r4 attention nf4",
    ]
    assert all(c.seeds == [0, 1, 2] for c in configs)
    comparisons = {c.name: c for c in find_comparisons(configs, defaults=DEFAULTS)}
    assert set(comparisons) == {"rank", "quantization"}
    rank = comparisons["rank"]
    assert [rank.value(c) for c in rank.configurations] == ["r4", "r8", "r16"]
    assert rank.value(rank.reference) == "r16" and rank.fixed == "attention nf4"  # the train default
    quantization = comparisons["quantization"]
    assert [quantization.value(c) for c in quantization.configurations] == ["nf4", "bf16"]
    assert quantization.value(quantization.reference) == "bf16"  # the 16-bit base QLoRA compares with


def test_findings_front_budgets_and_anchors_from_known_values():
    report = build_report(scope_of(known_runs()), defaults=DEFAULTS, budgets_mb=[995, 1012, 1020, 2000])
    findings = {(f.a, f.b): f for f in report.findings}
    assert findings[("r8", "r16")].differences[PERPLEXITY].verdict == "within noise"
    assert findings[("r4", "r16")].differences[PERPLEXITY].verdict == "larger than noise"
    assert "trainable parameters x0.50" in findings[("r8", "r16")].text
    assert findings[("nf4", "bf16")].differences["eval/exact_match"].verdict == "not measured"
    assert [c.label for c in report.fronts[PERPLEXITY]] == [
        "r4 attention nf4",
        "r8 attention nf4",
        "r16 attention bf16",
    ]
    # a budget holds a configuration when every seed's peak fits: r4 peaks at 1,010 MB, r8 at 1,015 MB
    best = [(r.budget_mb, r.best.label if r.best else None, r.fitting) for r in report.recommendations]
    assert best == [
        (995, None, 0),
        (1012, "r4 attention nf4", 1),
        (1020, "r8 attention nf4", 2),
        (2000, "r16 attention bf16", 4),
    ]
    assert [c.label for c in report.recommendations[-1].within_noise] == ["r8 attention nf4", "r16 attention nf4"]
    rank, modules, nf4 = report.anchors
    assert rank.verdicts[PERPLEXITY] == "disagrees" and "r4" in rank.evidence[PERPLEXITY]  # r4 worse than r8
    assert modules.verdict == "cannot tell"  # no module comparison in these runs
    assert nf4.verdicts[PERPLEXITY] == "agrees" and nf4.verdicts["eval/exact_match"] == "cannot tell"


def test_rank_anchor_agrees_when_every_rank_is_within_noise_and_cannot_tell_with_one_seed():
    runs = [run(f"r{r}", s, rank=r, **{PERPLEXITY: v}) for r in (4, 8) for s, v in enumerate((3.5, 3.7))]
    (rank, *_) = check_anchors(find_comparisons(group_configurations(runs), defaults=DEFAULTS))
    assert rank.verdicts[PERPLEXITY] == "agrees"
    one_seed = [run(f"r{r}", 0, rank=r, **{PERPLEXITY: 3.5 + r}) for r in (4, 8)]
    (rank, *_) = check_anchors(find_comparisons(group_configurations(one_seed), defaults=DEFAULTS))
    assert rank.verdicts[PERPLEXITY] == "cannot tell"


def test_modules_anchor_compares_the_widest_module_set_with_its_subsets():
    def modules_run(modules, resolved, seed, value):
        return run(modules, seed, modules=modules, resolved=resolved, **{PERPLEXITY: value})

    runs = [modules_run("all_linear", "q,k,v,o,gate,up,down", s, v) for s, v in enumerate((3.0, 3.02, 3.04))]
    runs += [modules_run("attention", "q,k,v,o", s, v) for s, v in enumerate((3.5, 3.52, 3.54))]
    (_, modules, _) = check_anchors(find_comparisons(group_configurations(runs), defaults=DEFAULTS))
    assert modules.verdicts[PERPLEXITY] == "agrees"
    runs += [modules_run("q_v", "q,v", s, v) for s, v in enumerate((2.9, 3.1, 3.3))]  # as good as all_linear
    (_, modules, _) = check_anchors(find_comparisons(group_configurations(runs), defaults=DEFAULTS))
    assert modules.verdicts[PERPLEXITY] == "disagrees" and "q_v" in modules.evidence[PERPLEXITY]


def test_budget_ladder_is_round_steps_over_the_peaks():
    assert budget_ladder([2571, 3616]) == [2500, 2750, 3000, 3250, 3500, 3750]
    assert budget_ladder([1000, 1000]) == [1000]
    assert recommend([], [1000])[0].best is None


def scope_of(runs):
    from lora_efficiency.report import Scope

    return Scope("toy", None, runs, [], [], [])
