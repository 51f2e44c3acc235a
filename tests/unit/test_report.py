"""The report's arithmetic on toy runs: intervals, paired differences and their ratios, equivalence against the
margin, Holm's correction, Pareto front, comparisons, budgets, anchors, full fine-tuning, the base's provenance.
Expected values are worked out by hand in the tests or their comments (t quantiles from tables)."""

from __future__ import annotations

import math

import pytest

from lora_efficiency.config import read_defaults
from lora_efficiency.report import (
    PERPLEXITY,
    Effect,
    Family,
    RunData,
    Stat,
    budget_ladder,
    build_report,
    cell,
    effect,
    find_comparisons,
    group_configurations,
    holm,
    pareto_front,
    recommend,
    welch,
)
from lora_efficiency.report.findings import recommendation_lines
from lora_efficiency.report.stats import CONSTANT, PAIRED, WELCH
from tests.report_store import EXACT_MATCH, PEAK_MB, train_params
from tests.report_store import PERPLEXITY as KNOWN

T_2 = 4.302653  # Student's t, 97.5 % quantile, 2 degrees of freedom
EXACT_MATCH_METRIC = "eval/exact_match"
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


def judge(eff, *others):
    """The judgement of `eff` in a family of itself and `others` (Holm over all of them)."""
    family = Family(alpha=0.05, margin=1.02)
    for i, e in enumerate((eff, *others)):
        family.add(i, e)
    family.close()
    return family[0]


def test_paired_difference_its_ratio_and_the_ratio_interval_by_hand():
    r8, r16 = {0: 3.5, 1: 3.6, 2: 3.7}, {0: 3.52, 1: 3.62, 2: 3.72}  # tests/report_store.py
    j = judge(effect(r8, r16, metric=PERPLEXITY, delta=math.log(1.02)))
    ds = [math.log(3.5 / 3.52), math.log(3.6 / 3.62), math.log(3.7 / 3.72)]  # differences of eval loss
    mean = sum(ds) / 3  # -0.005543
    sd = math.sqrt(sum((d - mean) ** 2 for d in ds) / 2)  # 0.000153
    half = T_2 * sd / math.sqrt(3)
    assert j.effect.design == PAIRED and j.effect.n == 3 and j.effect.df == 2
    assert j.effect.diff == pytest.approx(mean) and j.effect.interval(0.95) == (
        pytest.approx(mean - half, abs=1e-9),
        pytest.approx(mean + half, abs=1e-9),
    )
    # the ratio's interval is exp of the difference's interval, not the difference divided by a mean
    ratio, low, high = j.ratio
    assert (ratio, low, high) == (
        pytest.approx(math.exp(mean)),
        pytest.approx(math.exp(mean - half), abs=1e-9),
        pytest.approx(math.exp(mean + half), abs=1e-9),
    )
    assert j.text().startswith(
        "perplexity ratio 0.994, 95% [0.994, 0.995], 90% [0.994, 0.995] (3 pairs by seed; Holm p < 0.001, "
        "equivalence Holm p"
    )
    # TOST at 5 %: the 90 % interval (t = 2.919986 for 2 degrees of freedom) lies inside +-ln(1.02)
    half90 = 2.919986 * sd / math.sqrt(3)
    assert -math.log(1.02) < mean - half90 and mean + half90 < math.log(1.02)
    assert j.equivalent and j.verdict == "equivalent within ±2%"
    # consistent across seeds, so also beyond noise: a real difference, smaller than the margin
    assert j.beyond_noise and j.improves and "(better beyond noise, by less than the margin)" in j.text()


def test_equivalent_only_with_a_tight_interval_inside_the_margin():
    base = {0: 3.50, 1: 3.60, 2: 3.70, 3: 3.80}
    tight = {s: v * f for (s, v), f in zip(base.items(), (1.003, 0.998, 1.001, 1.0), strict=True)}
    assert judge(effect(tight, base, metric=PERPLEXITY, delta=math.log(1.02))).verdict == "equivalent within ±2%"
    # the same mean difference (about 0) but seeds that scatter by +-3 %: nothing is shown
    wide = {s: v * f for (s, v), f in zip(base.items(), (1.03, 0.97, 1.02, 0.985), strict=True)}
    j = judge(effect(wide, base, metric=PERPLEXITY, delta=math.log(1.02)))
    assert not j.beyond_noise and not j.equivalent and j.verdict == "cannot tell"
    # the table shows the 90 % interval the TOST decides on beside the 95 % one: [0.978, 1.027] reaches past
    # +-2 %, which is why this is "cannot tell" (t = 3.182446 and 2.353363 for 3 degrees of freedom)
    ds = [math.log(f) for f in (1.03, 0.97, 1.02, 0.985)]
    mean, sd = sum(ds) / 4, math.sqrt(sum((d - sum(ds) / 4) ** 2 for d in ds) / 3)
    ci95, ci90 = ([math.exp(mean + s * t * sd / 2) for s in (-1, 1)] for t in (3.182446, 2.353363))
    assert j.size() == (
        f"ratio {math.exp(mean):.3f}, 95% [{ci95[0]:.3f}, {ci95[1]:.3f}], 90% [{ci90[0]:.3f}, {ci90[1]:.3f}]"
    )
    assert ci90[1] > 1.02
    # no margin (exact match): never equivalent, whatever the interval
    em = judge(effect({0: 0.30, 1: 0.31, 2: 0.30}, {0: 0.30, 1: 0.30, 2: 0.31}, metric=EXACT_MATCH_METRIC))
    assert em.p_equivalence is None and em.verdict == "cannot tell"


def test_holm_turns_a_borderline_verdict_into_cannot_tell():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 x 0.01, max(2 x 0.03, 0.04)...
    assert holm([0.2, 0.01]) == pytest.approx([0.2, 0.02])
    # t = 6 with 2 degrees of freedom: p = 2 P(T > 6) = 0.0267 < 0.05 alone
    borderline = Effect(PERPLEXITY, PAIRED, 3, 0.06, 0.01, 2)
    alone = judge(borderline)
    assert alone.p_difference == pytest.approx(0.026671, abs=1e-5) and alone.verdict == "worse"
    # one more test in the report's family (p = 0.5): 2 x 0.0267 = 0.053 > 0.05
    other = Effect(PERPLEXITY, PAIRED, 3, 0.00816, 0.01, 2)
    corrected = judge(borderline, other)
    assert corrected.p_difference == pytest.approx(2 * 0.026671, abs=1e-4) and corrected.verdict == "cannot tell"


def test_pairing_by_seed_removes_a_seed_effect_both_configurations_share():
    # the seed moves perplexity by 30 %; b is about 3 % worse than a at every seed
    a = {0: 3.00, 1: 3.50, 2: 4.00}
    b = {0: 3.09, 1: 3.62, 2: 4.12}
    paired = judge(effect(a, b, metric=PERPLEXITY, delta=math.log(1.02)))
    assert paired.effect.design == PAIRED and paired.verdict == "better"  # lower perplexity beyond noise
    logs = [math.log(v) for v in a.values()], [math.log(v) for v in b.values()]
    unpaired = judge(welch(*logs, metric=PERPLEXITY, delta=math.log(1.02)))
    assert unpaired.effect.design == WELCH and unpaired.verdict == "cannot tell"
    assert unpaired.effect.diff == pytest.approx(paired.effect.diff)  # the same estimate, not the same noise
    # without a seed in common the runs cannot be paired: Welch, and the text says so
    disjoint = effect(a, {s + 3: v for s, v in b.items()}, metric=PERPLEXITY)
    assert disjoint.design == WELCH and "unpaired Welch" in judge(disjoint).text()


def test_differences_that_cannot_be_decided():
    one = judge(effect({0: 3.5}, {0: 3.6, 1: 3.7}, metric=PERPLEXITY))
    assert one.verdict == "cannot tell" and one.text().endswith("cannot tell (one seed)")
    assert judge(effect({}, {0: 3.6, 1: 3.7}, metric=PERPLEXITY)).text() == "perplexity not measured"
    # one seed in common: one pair gives no interval
    few = judge(effect({0: 3.5, 1: 3.6}, {1: 3.6, 2: 3.7}, metric=PERPLEXITY))
    assert few.verdict == "cannot tell" and "fewer than 2 seeds in common" in few.text()
    # 1 of 30 answers right with both seeds against 0 of 30: the seeds show no noise, so nothing is decided
    same = judge(effect({0: 1 / 30, 1: 1 / 30}, {0: 0.0, 1: 0.0}, metric=EXACT_MATCH_METRIC))
    assert same.verdict == "cannot tell" and "no noise estimate" in same.text()
    # float rounding (0.1 - 0.3 is not 0.2 - 0.4) is no noise either
    rounding = effect({0: 0.1, 1: 0.2, 2: 0.3}, {0: 0.3, 1: 0.4, 2: 0.5}, metric=EXACT_MATCH_METRIC)
    assert not rounding.tested
    points = judge(effect({0: 0.3, 1: 0.4, 2: 0.5}, {0: 0.1, 1: 0.25, 2: 0.3}, metric=EXACT_MATCH_METRIC))
    assert points.text().startswith("exact match +18.3 points [")


def test_a_constant_reference_uses_one_sample_t_on_the_log_scale():
    d = effect({0: 4.0, 1: 4.1, 2: 4.2}, 4.0, metric=PERPLEXITY)
    xs = [math.log(v / 4.0) for v in (4.0, 4.1, 4.2)]
    mean = sum(xs) / 3
    half = T_2 * math.sqrt(sum((x - mean) ** 2 for x in xs) / 2) / math.sqrt(3)
    assert d.design == CONSTANT and d.interval(0.95) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert judge(d).verdict == "cannot tell" and "against one evaluation, unpaired" in judge(d).text()


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
    # r8 is 0.02 below r16 at every seed: paired, that is a consistent -0.55 %, inside the +-2 % margin
    assert findings[("r8", "r16")].judgements[PERPLEXITY].verdict == "equivalent within ±2%"
    assert findings[("r4", "r16")].judgements[PERPLEXITY].verdict == "worse"
    assert "trainable parameters x0.50" in findings[("r8", "r16")].text
    assert findings[("nf4", "bf16")].judgements["eval/exact_match"].verdict == "not measured"
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
    # r8 and r16 were "within noise" of bf16, which is not equivalence: their seeds scatter by +-3 %
    assert report.recommendations[-1].equivalent == []
    # and the best at 2,000 MB (bf16) is best by its mean only against them; r4 it beats beyond noise
    last = report.recommendations[-1]
    assert [c.label for c in last.beaten] == ["r4 attention nf4"]
    assert sorted(c.label for c in last.undecided) == ["r16 attention nf4", "r8 attention nf4"]
    (line,) = [x for x in recommendation_lines(report.recommendations) if x.startswith("2,000 MB")]
    assert "better beyond noise than r4 attention nf4" in line and "r8 attention nf4" in line.split("cannot tell")[0]
    rank, modules, nf4 = report.anchors
    assert rank.verdicts[PERPLEXITY] == "disagrees" and "r4" in rank.evidence[PERPLEXITY]  # r4 13 % worse than r8
    assert rank.verdicts["eval/exact_match"] == "cannot tell"  # no margin is declared for exact match
    assert modules.verdict == "cannot tell"  # no module comparison in these runs
    # nf4 vs bf16 differ by 1.4 % with an interval of -4 % to +7 %: not detected is not "agrees"
    assert nf4.verdicts[PERPLEXITY] == "cannot tell" and nf4.verdicts["eval/exact_match"] == "cannot tell"
    assert "theirs: GPT-3 175B" in rank.setup and "ours: HuggingFaceTB/SmolLM2-135M-Instruct, 3 steps" in rank.setup
    # the family: every finding, anchor and recommendation test once (r8 vs r16 and r16 vs r8 are one test).
    # Perplexity: r4-r16, r8-r16, nf4-bf16 (findings), r4-r8 (anchor), r4-bf16, r8-bf16 (budget 2,000 MB): 6 tests
    # of each kind; peak memory of the 3 findings: 3 more differences; exact match: none (seeds without noise)
    assert report.family.equivalence_tests == 6 and report.family.difference_tests == 9


def test_adapters_against_the_base_alone_are_difference_tests_only():
    from lora_efficiency.report import Scope

    # the nf4 base alone, evaluated once: the three nf4 adapters (r4, r8, r16) are each tested against it on
    # perplexity (its only metric here), as differences; an equivalence test against an untrained base cannot
    # pass and would only raise the Holm multiplier of the declared ones, so there is none
    params = {**{k: str(v) for k, v in train_params(16, "nf4", 0).items()}, "quantization": "nf4"}
    base = RunData(
        "b".ljust(32, "0"), "baseline", "FINISHED", 0, params, {"eval/perplexity": 6.0}, {"baseline": "true"}
    )
    report = build_report(
        Scope("toy", None, known_runs(), [], [base], []), defaults=DEFAULTS, budgets_mb=[995, 1012, 1020, 2000]
    )
    assert report.family.equivalence_tests == 6 and report.family.difference_tests == 9 + 3
    assert all(report.family[k].p_equivalence is None for k in report.family._effects if k[1].startswith("baseline:"))


def test_a_quick_profile_report_opens_by_saying_it_is_a_smoke_test():
    from lora_efficiency.report import Scope
    from lora_efficiency.report.render import SMOKE_TEST, _scope_blocks

    def sweep(profile):
        return RunData("s".ljust(32, "0"), "sweep-rank", "FINISHED", 0, {}, {}, {"profile": profile})

    def first_lines(profile):
        scope = Scope("toy", None, known_runs(), [], [], [sweep(profile)])
        return _scope_blocks(build_report(scope, defaults=DEFAULTS))[:2]

    assert first_lines("quick") == [("h1", "LoRA efficiency report: toy"), ("p", SMOKE_TEST)]
    assert "smoke test" not in first_lines("standard")[1][1]


def scaled(values: dict[int, float], factors: tuple[float, ...]) -> dict[int, float]:
    return {s: v * f for (s, v), f in zip(values.items(), factors, strict=True)}


def test_rank_anchor_agrees_only_on_equivalence_never_on_a_difference_not_detected():
    r4 = {0: 3.50, 1: 3.60, 2: 3.70, 3: 3.80}
    for r8, verdict in (
        (scaled(r4, (1.003, 0.998, 1.001, 1.0)), "agrees"),  # tight, inside +-2 %
        (scaled(r4, (1.03, 0.97, 1.02, 0.985)), "cannot tell"),  # within noise, but the noise is +-3 %
    ):
        runs = [run("r4", s, rank=4, **{PERPLEXITY: v}) for s, v in r4.items()]
        runs += [run("r8", s, rank=8, **{PERPLEXITY: v}) for s, v in r8.items()]
        (rank, *_) = build_report(scope_of(runs), defaults=DEFAULTS).anchors
        assert rank.verdicts[PERPLEXITY] == verdict, rank.evidence[PERPLEXITY]
    one_seed = [run(f"r{r}", 0, rank=r, **{PERPLEXITY: 3.5 + r}) for r in (4, 8)]
    (rank, *_) = build_report(scope_of(one_seed), defaults=DEFAULTS).anchors
    assert rank.verdicts[PERPLEXITY] == "cannot tell"


def test_modules_anchor_compares_the_widest_module_set_with_its_subsets():
    def modules_run(modules, resolved, seed, value):
        return run(modules, seed, modules=modules, resolved=resolved, **{PERPLEXITY: value})

    widest = {0: 3.0, 1: 3.02, 2: 3.04}
    runs = [modules_run("all_linear", "q,k,v,o,gate,up,down", s, v) for s, v in widest.items()]
    runs += [modules_run("attention", "q,k,v,o", s, v) for s, v in enumerate((3.5, 3.52, 3.54))]
    (_, modules, _) = build_report(scope_of(runs), defaults=DEFAULTS).anchors
    assert modules.verdicts[PERPLEXITY] == "agrees"
    # a subset as good on average but scattered: not beaten, not shown equivalent either
    scattered = runs + [modules_run("q_v", "q,v", s, v) for s, v in enumerate((2.9, 3.1, 3.3))]
    (_, modules, _) = build_report(scope_of(scattered), defaults=DEFAULTS).anchors
    assert modules.verdicts[PERPLEXITY] == "cannot tell"
    # a subset equivalent to the widest set: against the claim
    matched = runs + [modules_run("q_v", "q,v", s, v) for s, v in scaled(widest, (1.002, 0.999, 1.001)).items()]
    (_, modules, _) = build_report(scope_of(matched), defaults=DEFAULTS).anchors
    assert modules.verdicts[PERPLEXITY] == "disagrees" and "q_v" in modules.evidence[PERPLEXITY]


def test_qlora_anchor_is_not_comparable_on_a_base_dequantized_from_a_gguf():
    runs = known_runs()
    nf4 = next(a for a in build_report(scope_of(runs), defaults=DEFAULTS).anchors if "NF4" in a.claim)
    assert nf4.verdicts[PERPLEXITY] == "cannot tell"
    for r in runs:
        r.tags |= {"base_gguf_type": "Q4_1", "base_checkpoint_dtype": "bfloat16"}
    report = build_report(scope_of(runs), defaults=DEFAULTS)
    nf4 = report.anchors[2]
    assert nf4.verdict == "not comparable on this base"
    assert set(nf4.verdicts.values()) == {"not comparable on this base"}
    assert "dequantized from a Q4_1 GGUF: bf16 already sits on a 4-bit grid" in nf4.evidence[PERPLEXITY]
    assert "nf4 vs bf16: perplexity ratio" in nf4.evidence[PERPLEXITY]  # the numbers are still shown
    (line,) = report.provenance
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in line and "Q4_1 GGUF, checkpoint dtype bfloat16" in line


def test_full_fine_tuning_is_labelled_so_and_is_the_reference_of_lora():
    def full(seed, value):
        r = run("full", seed, quantization="bf16", **{PERPLEXITY: value})
        r.params |= {"method": "full", "lr": "2e-05"}
        r.tags["config_hash"] = "full-ft"
        return r

    runs = [run("r16", s, quantization="bf16", **{PERPLEXITY: v}) for s, v in enumerate((3.60, 3.62, 3.64))]
    runs += [run("r8", s, rank=8, quantization="bf16", **{PERPLEXITY: v}) for s, v in enumerate((3.7, 3.6, 3.5))]
    runs += [full(s, v) for s, v in enumerate((3.40, 3.42, 3.44))]
    report = build_report(scope_of(runs), defaults=DEFAULTS)
    assert {c.label for c in report.configurations} == {
        "full FT lr=2e-05",
        "r16 attention bf16 lr=0.0002",
        "r8 attention bf16 lr=0.0002",
    }
    comps = {c.name: c for c in report.comparisons}
    assert set(comps) == {"rank", "full FT"}
    assert comps["full FT"].reference.label == "full FT lr=2e-05" and len(comps["full FT"].configurations) == 3
    finding = next(f for f in report.findings if f.comparison == "full FT" and f.a.startswith("r16"))
    assert finding.b == "full FT lr=2e-05" and finding.judgements[PERPLEXITY].verdict == "worse"
    assert finding.judgements[PERPLEXITY].ratio[0] == pytest.approx(
        math.exp(sum(math.log(v / (v - 0.2)) for v in (3.60, 3.62, 3.64)) / 3)
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--margin", "0.98"], "margin=0.98 is invalid: a perplexity ratio > 1"),
        (["--margin", "1"], "margin=1.0 is invalid: a perplexity ratio > 1"),
        (["--margin", "wide"], "margin='wide' is invalid: a number"),
        (["--alpha", "0.5"], "alpha=0.5 is invalid: a level between 0 and 0.5"),
        (["--alpha", "0"], "alpha=0.0 is invalid: a level between 0 and 0.5"),
    ],
)
def test_a_bad_margin_or_alpha_is_a_one_line_error(argv, message, capsys, monkeypatch, tmp_path):
    from entrypoints.report import main
    from lora_efficiency.cli import run_cli

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert not (tmp_path / "mlflow.db").exists()  # refused before any store is opened


def test_budget_ladder_is_round_steps_over_the_peaks():
    assert budget_ladder([2571, 3616]) == [2500, 2750, 3000, 3250, 3500, 3750]
    assert budget_ladder([1000, 1000]) == [1000]
    assert recommend([], [1000])[0].best is None


def scope_of(runs):
    from lora_efficiency.report import Scope

    return Scope("toy", None, runs, [], [], [])


def test_convergence_section_says_which_configurations_were_still_improving():
    from lora_efficiency.report.convergence import CONVERGED, IMPROVING, UNKNOWN, convergence_section, status

    runs = known_runs()
    for r in runs:  # r4 converged on every seed, r8 one seed still improving, r16 and bf16 without a curve
        if r.name.startswith("r4-"):
            r.tags["converged"], r.metrics["val/window_improvement"], r.metrics["val/loss"] = "converged", 0.004, 1.5
        if r.name.startswith("r8-"):
            r.tags["converged"] = "improving" if r.seed == 1 else "converged"
            r.metrics["val/window_improvement"] = 0.05 if r.seed == 1 else 0.002
    report = build_report(scope_of(runs), defaults=DEFAULTS)
    by_label = {c.label: status(c) for c in report.configurations}
    assert sorted(s for s, _ in by_label.values()) == sorted([CONVERGED, IMPROVING, UNKNOWN, UNKNOWN])
    assert (IMPROVING, "1 of 3 seeds improving") in by_label.values()
    assert (CONVERGED, "3 of 3 seeds converged") in by_label.values()
    blocks = convergence_section(report)
    (_, header, rows) = next(b for b in blocks if b[0] == "table")
    row = next(r for r in rows if r[-1].startswith(IMPROVING))
    # the mean fall over the window and the seeds' range, in percent: (0.2 + 5.0 + 0.2) / 3 = 1.80
    assert row[3] == "1.80% (seeds 0.20% to 5.00%)"
    assert "3 of 4 configurations had not converged" in blocks[-1][1]


def test_without_validation_curves_the_report_says_convergence_cannot_be_told():
    from lora_efficiency.report.convergence import convergence_section

    blocks = convergence_section(build_report(scope_of(known_runs()), defaults=DEFAULTS))
    assert "No run logged a validation curve" in blocks[-1][1]


def test_a_configuration_whose_validation_loss_rose_got_worse_whatever_its_tag_says():
    from lora_efficiency.report.convergence import WORSENED, convergence_section, status

    runs = known_runs()
    for r in runs:
        if r.name.startswith("r4-"):  # logged by an earlier rule that called a rising loss "converged"
            r.tags["converged"], r.params["converge_tol"] = "converged", "0.01"
            r.metrics["val/window_improvement"] = -0.3 if r.seed == 1 else 0.005
    report = build_report(scope_of(runs), defaults=DEFAULTS)
    r4 = next(c for c in report.configurations if c.settings["rank"] == "4")
    assert status(r4) == (WORSENED, "1 of 3 seeds rose by more than converge_tol over the window")
    assert "got worse over the second half" in convergence_section(report)[-1][1]


def _families_report(config_runs, baselines=()):
    from types import SimpleNamespace

    configs = [SimpleNamespace(label=label, runs=runs) for label, runs in config_runs]
    return SimpleNamespace(configurations=configs, scope=SimpleNamespace(baselines=list(baselines)))


def test_task_family_section_shows_means_per_family():
    from types import SimpleNamespace

    from lora_efficiency.report.families import families_section

    def run(ppl_json, em_json, ppl_math=None):
        metrics = {"eval/perplexity/json": ppl_json, "eval/exact_match_by_kind/json": em_json}
        if ppl_math is not None:
            metrics["eval/perplexity/math"] = ppl_math
        return SimpleNamespace(metrics=metrics)

    base = SimpleNamespace(metrics={"eval/perplexity/json": 9.0}, storage="nf4")
    report = _families_report([("r8", [run(2.0, 0.5, 4.0), run(3.0, 1.0, 6.0)]), ("r16", [run(1.5, 0.25)])], [base])
    (_, title), _, (_, header, rows) = families_section(report)
    assert title == "Task families"
    assert header == [
        "configuration",
        "seeds",
        "json: perplexity",
        "math: perplexity",
        "json: exact match by kind (%)",
        "math: exact match by kind (%)",
    ]
    assert rows[0] == ["r8", "2", "2.500", "5.000", "75.0", "-"]
    assert rows[1] == ["r16", "1", "1.500", "-", "25.0", "-"]
    assert rows[2] == ["baseline: no adapter, nf4", "1", "9.000", "-", "-", "-"]


def test_task_family_section_says_when_older_runs_cannot_show_it():
    from types import SimpleNamespace

    from lora_efficiency.report.families import families_section

    older = SimpleNamespace(metrics={"eval/perplexity": 3.0, "eval/exact_match": 0.4})
    blocks = families_section(_families_report([("r8", [older])]))
    assert [b[0] for b in blocks] == ["h2", "p"]
    assert "cannot be shown" in blocks[1][1]


def test_the_old_answer_length_dependent_speed_is_shown_apart_only_for_runs_that_logged_it():
    from types import SimpleNamespace

    from lora_efficiency.report.render import configuration_rows

    def report(metrics):
        run = SimpleNamespace(metrics=metrics)
        config = SimpleNamespace(label="r8", seeds=[0], runs=[run], stats={m: Stat((v,)) for m, v in metrics.items()})
        return SimpleNamespace(configurations=[config], scope=SimpleNamespace(baselines=[]), fronts={})

    new_header, new_rows = configuration_rows(report({"inference/decode_tokens_per_second": 50.0}))
    assert "generation speed (tokens/s)" in new_header
    assert not any("answer-length dependent" in h for h in new_header)
    old_header, old_rows = configuration_rows(report({"inference/tokens_per_second": 20.0}))
    legacy = old_header.index("generation speed, answer-length dependent (older runs) (tokens/s)")
    assert old_rows[0][legacy] == "20.0 (1 seed)"
    assert old_rows[0][old_header.index("generation speed (tokens/s)")] == "not measured"


def test_forgetting_section_sets_task_gain_against_general_text_lost_per_configuration():
    """Biderman et al. 2024's trade-off per configuration: eval perplexity over the base alone's (the baseline of
    its storage) against forget/ratio, each a geometric mean over seeds with its 95% interval on the log scale
    (values by hand: ln ratios, t(0.975, 2) = 4.303)."""
    from types import SimpleNamespace

    from lora_efficiency.report.forgetting import forgetting_section

    def seed(ppl, ratio=None):
        metrics = {"eval/perplexity": ppl}
        if ratio is not None:
            metrics |= {"forget/ratio": ratio, "forget/perplexity": 10 * ratio, "forget/base_perplexity": 10.0}
        return SimpleNamespace(metrics=metrics)

    lora = SimpleNamespace(
        label="r16", settings={"quantization": "bf16"}, runs=[seed(4.0, 1.10), seed(3.6, 1.20), seed(4.4, 1.15)]
    )
    older = SimpleNamespace(label="r4 nf4", settings={"quantization": "nf4"}, runs=[seed(5.0)])
    base = SimpleNamespace(metrics={"eval/perplexity": 8.0}, storage="bf16")
    report = SimpleNamespace(configurations=[lora, older], scope=SimpleNamespace(baselines=[base]))
    (_, title), (_, intro), (_, header, rows) = forgetting_section(report)
    assert title == "Forgetting" and "LoRA Learns Less and Forgets Less" in intro
    assert header[2:] == [
        "task gain: perplexity / the base alone's",
        "general text: perplexity before",
        "general text: perplexity after",
        "forgetting: after / before",
    ]
    assert rows[0] == ["r16", "3", "0.498 [0.388, 0.639]", "10.000", "11.500", "1.149 [1.032, 1.280]"]
    assert rows[1] == ["r4 nf4", "1", "no nf4 baseline", "-", "-", "-"]  # logged before forgetting, no nf4 base


def test_forgetting_section_says_when_no_run_logged_it():
    from types import SimpleNamespace

    from lora_efficiency.report.forgetting import forgetting_section

    older = SimpleNamespace(label="r8", settings={"quantization": "nf4"}, runs=[SimpleNamespace(metrics={})])
    blocks = forgetting_section(SimpleNamespace(configurations=[older], scope=SimpleNamespace(baselines=[])))
    assert [b[0] for b in blocks] == ["h2", "p"] and "No run logged forgetting" in blocks[1][1]


def test_a_configuration_trained_under_two_names_is_reported_once_with_both():
    """The quick study of 2026-12-04 trained attention_mlp and all_linear (the same seven matrices on SmolLM2) and
    listed them twice with identical numbers: the report keeps all_linear's runs and names it with both."""
    from lora_efficiency.report.runs import one_per_resolved_modules

    seven = "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"
    runs = [run("al", s, modules="all_linear", resolved=seven, **{"eval/perplexity": 3.1 + s / 100}) for s in range(3)]
    runs += [
        run("am", s, modules="attention_mlp", resolved=seven, **{"eval/perplexity": 3.1 + s / 100}) for s in (0, 1)
    ]
    runs += [run("at", s, modules="attention", **{"eval/perplexity": 3.5}) for s in range(3)]
    kept, notes = one_per_resolved_modules(runs)
    assert sorted(r.name for r in kept) == ["al-s0", "al-s1", "al-s2", "at-s0", "at-s1", "at-s2"]
    assert notes == [
        f"2 runs of target_modules=attention_mlp left out: they adapt the same modules as all_linear ({seven}), one "
        "configuration trained under two names"
    ]
    labels = [c.label for c in group_configurations(kept)]
    assert labels == ["r16 all_linear (= attention_mlp) nf4", "r16 attention nf4"]
    # a sweep that trained all_linear in place of attention_mlp (its tag) names it the same way
    alone = [run("al", s, modules="all_linear", resolved=seven) for s in range(2)]
    kept, notes = one_per_resolved_modules(alone, {"all_linear": {"attention_mlp"}})
    assert notes == [] and {r.settings["target_modules"] for r in kept} == {"all_linear (= attention_mlp)"}
    # runs that did not log what they adapted are never merged
    unknown = [run("x", 0, modules="all_linear", resolved=""), run("y", 0, modules="attention_mlp", resolved="")]
    assert len(one_per_resolved_modules(unknown)[0]) == 2


def test_time_split_section_shows_each_configurations_phases_from_its_runs_metrics():
    from lora_efficiency.report.render import _document
    from lora_efficiency.report.timing import TITLE, time_split_section

    runs = known_runs()
    for r in runs:  # each run: 100 s of wall clock, phases by seed
        r.start_ms, r.end_ms = 1_000_000 * (r.seed + 1), 1_000_000 * (r.seed + 1) + 100_000
        r.metrics |= {"time/setup_s": 4.0, "time/train_s": 80.0 + r.seed, "time/forgetting_s": 3.0}
        r.metrics |= {"time/evaluation_s": 6.0, "time/logging_s": 1.0, "time/model_logging_s": 0.5}
    runs[0].end_ms = 0  # still running: left out of its configuration's mean
    report = build_report(scope_of(runs), defaults=DEFAULTS)
    (h2, _), (p, _), (kind, header, rows) = time_split_section(report)
    assert h2 == "h2" and kind == "table" and TITLE in [b[1] for b in _document(report, {}) if b[0] == "h2"]
    assert header[:3] == ["configuration", "runs", "wall clock (s)"] and header[-2:] == ["other (s)", "training share"]
    by_label = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    r4 = by_label[next(c.label for c in report.configurations if c.runs[0].name.startswith("r4-"))]
    # r4: seeds 1 and 2 (seed 0 has no end): train 81 and 82 s -> 81.5; other = 100 - (4 + 81.5 + 0 + 3 + 6 + 1.5)
    assert (r4["runs"], r4["wall clock (s)"], r4["setup (s)"], r4["training (s)"]) == ("2", "100.0", "4.0", "81.5")
    assert (r4["validation (s)"], r4["forgetting (s)"], r4["evaluation (s)"], r4["logging (s)"]) == (
        "0.0",
        "3.0",
        "6.0",
        "1.5",
    )
    assert r4["other (s)"] == "4.0" and r4["training share"] == "82%"
    assert len(rows) == 4
    for r in runs:  # runs without the metrics (logged before them): no section
        r.metrics.pop("time/train_s")
    assert time_split_section(build_report(scope_of(runs), defaults=DEFAULTS)) == []
