"""Issue 28's done-when: a study that declared r4 vs r16 (equivalence within +/-2 %) is reported from a real
(SQLite) tracking store through the runs API: 10 seeds of tight pairs read "equivalent"; 3 seeds of wide pairs read
"cannot tell" and say how many seeds would decide."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from mlflow import MlflowClient

from lora_efficiency.design import seeds_needed
from lora_efficiency.report import build_report, fetch_scope
from lora_efficiency.report.runs import PER_EXAMPLE_LOSSES as TABLE
from lora_efficiency.report.runs import declared_contrasts, fetch_per_example_losses
from tests.report_store import CONTRAST, EVAL_SETTINGS, _log, train_params

DEFAULTS = {"rank": 16, "target_modules": "all_linear", "quantization": "nf4", "double_quant": True}


def unit_spread(n: int) -> list[float]:
    """n fixed numbers of mean 0 and sample sd 1 (evenly spaced, then scaled): known, not random."""
    xs = [i - (n - 1) / 2 for i in range(n)]
    sd = math.sqrt(sum(x * x for x in xs) / (n - 1))
    return [x / sd for x in xs]


def build(
    client: MlflowClient,
    experiment: str,
    diffs: list[float],
    examples: list[float] | None = None,
    skip: str = "",
    families: dict[str, tuple[float, float]] | None = None,
    contrast: dict = CONTRAST,
) -> None:
    """A study run declaring the contrast and one sweep of r4 and r16 on all linear layers; r16's eval loss is 1.2
    at every seed, r4's is 1.2 + diffs[seed] (so the paired differences of ln perplexity are exactly diffs). With
    `examples` (mean 0), each run also logs per_example_losses.json: r4's example j has loss 1.2 + diffs[seed] +
    examples[j], r16's 1.2; the run named `skip` logs none. `families`: name -> (r16's perplexity on it, r4's
    ratio to it), each seed moved by its diffs too."""
    exp = client.create_experiment(experiment)
    tags = {"entry_point": "main", "study_contrasts": json.dumps([contrast])}
    study = client.create_run(exp, run_name="study", tags=tags).info.run_id
    sweep = client.create_run(exp, run_name="sweep", tags={"mlflow.parentRunId": study, "entry_point": "sweep"})
    for rank in (4, 16):
        config_hash = f"r{rank}-all-linear"
        for seed, d in enumerate(diffs):
            loss = 1.2 + (d if rank == 4 else 0.0)
            params = {**train_params(rank, "nf4", seed), "target_modules": "all_linear"}
            key = hashlib.sha256(f"{config_hash}-{seed}".encode()).hexdigest()[:16]
            run = client.create_run(
                exp,
                run_name=f"r{rank}-s{seed}",
                tags={"mlflow.parentRunId": sweep.info.run_id, "sweep_key": key, "seed": str(seed)},
            ).info.run_id
            metrics = {
                "eval/perplexity": math.exp(loss),
                "eval/loss": loss,
                "memory/peak_mb": 1000 + rank * (1 + seed % 3),
                "time/train_s": 1800.0 if rank == 4 else 1960.0,
            }
            for name, (ppl, ratio) in (families or {}).items():
                metrics[f"eval/perplexity/{name}"] = ppl * (ratio * math.exp(d) if rank == 4 else 1.0)
            run_tags = {"config_hash": config_hash, "eval_settings": EVAL_SETTINGS, "quantization": "nf4"}
            _log(client, run, params=params, metrics=metrics, tags=run_tags)
            if examples is not None and f"r{rank}-s{seed}" != skip:
                losses = [loss + (e if rank == 4 else 0.0) for e in examples]
                rows = [[j, "t", 1, x] for j, x in enumerate(losses)]
                client.log_dict(run, {"columns": ["example", "task", "tokens", "loss"], "data": rows}, TABLE)
            client.set_terminated(run, "FINISHED")
    client.set_terminated(sweep.info.run_id, "FINISHED")
    client.set_terminated(study, "FINISHED")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    client = MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('design-store')}/mlflow.db")
    build(client, "tight", [0.001 + 0.003 * z for z in unit_spread(10)])  # mean 0.1 %, sd 0.003
    build(client, "wide", [0.02 * z for z in unit_spread(3)])  # 3 seeds, sd 0.02
    # 10 seeds whose pairs alone decide (sd 0.003), but 100 examples of sd 0.15: the examples' se 0.015 alone
    # puts the 90 % interval's half-width near 1.66 x 0.015 = 0.025 > ln 1.02 = 0.0198
    build(client, "noisy-examples", [0.001 + 0.003 * z for z in unit_spread(10)], [0.15 * z for z in unit_spread(100)])
    # arithmetic: r4 15 % worse; json at its ceiling (1.00) where any ratio is 1
    families = {"arithmetic": (3.56, 1.15), "json": (1.0, 1.0)}
    build(client, "families", [0.001 + 0.003 * z for z in unit_spread(10)], families=families)
    # the same contrast declared as a difference (seeds sized for 5%): date equal on both
    difference = {**CONTRAST, "test": "difference", "margin": 0.05}
    build(
        client,
        "families-difference",
        [0.001 + 0.003 * z for z in unit_spread(10)],
        families={"date": (2.0, 1.0)},
        contrast=difference,
    )
    build(client, "one-missing", [0.02 * z for z in unit_spread(3)], [0.1 * z for z in unit_spread(20)], "r4-s1")
    return client


def report_of(client, experiment: str):
    scope = fetch_scope(client, experiment=experiment)
    per_example = fetch_per_example_losses(client, scope.runs)
    return build_report(scope, defaults=DEFAULTS, contrasts=declared_contrasts(scope), per_example=per_example)


def test_ten_tight_seeds_of_a_declared_contrast_read_equivalent(client):
    report = report_of(client, "tight")
    (declared,) = report.declared
    assert (declared.a.settings["rank"], declared.b.settings["rank"]) == ("4", "16")
    j = report.family[next(iter(report.family._declared))]
    assert j.declared == CONTRAST["name"] and j.verdict == "equivalent within ±2%" and j.holm_size == 1
    (line,) = report.declared_lines
    assert line.startswith("rank r4 vs r16 (all linear) (equivalence within ±2% on perplexity, declared")
    assert "equivalent within ±2%" in line and "90% [" in line
    # the declared contrast alone is confirmatory: the memory test of the same pair is exploratory
    assert report.family.declared_tests == 1


def test_three_wide_seeds_read_cannot_tell_and_say_how_many_seeds_would_decide(client):
    report = report_of(client, "wide")
    (line,) = report.declared_lines
    n = seeds_needed(0.02, 0.02, "equivalence")
    assert n == 11  # sd 0.02, +/-2 %, one contrast: 80 % power at true ratio 1
    assert f"cannot tell; ~{n} seeds would decide equivalence within ±2%" in line, line


def test_an_undeclared_test_is_marked_exploratory(client):
    report = report_of(client, "wide")
    (finding,) = report.findings
    perplexity, memory = finding.text.split("; peak memory")[:2]
    assert "declared contrast 'rank r4 vs r16 (all linear)'" in perplexity and "exploratory" not in perplexity
    assert "(3 pairs by seed; exploratory, Holm p" in memory, memory


def test_the_examples_noise_read_through_the_runs_api_widens_the_interval(client):
    (line,) = report_of(client, "noisy-examples").declared_lines
    assert "noise of seeds and 100 examples" in line and "cannot tell" in line, line
    # the examples' noise does not shrink with seeds: no number of them decides at this evaluation's size
    assert "no number of seeds would decide equivalence within ±2%" in line, line
    tight = report_of(client, "tight")  # no run logged the artifact: seeds only, said once in the Methods
    assert "noise of" not in tight.declared_lines[0] and all(c.losses is None for c in tight.configurations)


def test_a_pair_without_per_example_losses_falls_back_to_the_seeds_and_says_so(client):
    report = report_of(client, "one-missing")
    (line,) = report.declared_lines
    assert "noise of seeds only: 1 of 3 pairs have no per-example losses" in line, line


def test_plan_reads_the_spread_of_earlier_runs_and_prices_the_seeds_it_asks_for(client):
    from lora_efficiency.design import parse_contrasts
    from lora_efficiency.report import group_configurations
    from lora_efficiency.report.power import plan_lines

    configs = group_configurations(fetch_scope(client, experiment="wide").runs)
    contrasts = parse_contrasts([CONTRAST, {**CONTRAST, "name": "again", "a": {"rank": 8}}])
    header, line, unmatched = plan_lines(contrasts, 3, configs=configs, defaults=DEFAULTS)
    assert header.startswith("2 declared contrasts, Holm over 2 planned at alpha / 2 = 0.025")
    n = seeds_needed(0.02, 0.02, "equivalence", 2)
    assert "paired sd 0.0200 (measured on r4 all_linear nf4 vs r16 all_linear nf4, 3 pairs (seeds))" in line
    assert f"{n} seeds give 80% power; the profile's 3 seeds: power 0.0" in line, line
    assert f"cost: {n} x (1,800 s + 1,960 s) = {n * 3760 / 3600:.1f} h" in line, line
    # r8 was never run: the spread pooled over the pairs the earlier runs compared
    assert "pooled over the 1 paired comparisons" in unmatched and "cost: not measured" in unmatched, unmatched


def test_per_family_verdicts_of_a_declared_contrast_leave_out_families_at_their_ceiling(client):
    report = report_of(client, "families")
    arithmetic, ceiling = report.family_lines
    assert arithmetic.startswith("rank r4 vs r16 (all linear) on task family arithmetic: perplexity ratio 1.151")
    assert arithmetic.endswith("): worse"), arithmetic
    assert ceiling == "at their ceiling (perplexity below 1.10), not tested: rank r4 vs r16 (all linear), json (1.00)"
    assert "equivalent within ±2%" in report.declared_lines[0]  # overall equivalent, while arithmetic is worse


def test_per_family_equivalence_of_a_difference_contrast_uses_the_reports_margin_not_the_sized_effect(client):
    # the contrast's 5% is the effect its seeds were sized for: no one declared equivalence within it
    (date,) = report_of(client, "families-difference").family_lines
    assert date.startswith("rank r4 vs r16 (all linear) on task family date: perplexity ratio 1.00"), date
    assert "±5%" not in date and date.endswith("): equivalent within ±2%"), date


def test_the_written_report_shows_the_declared_family_first_and_the_rest_as_exploratory(client, tmp_path):
    from lora_efficiency.report import write_report

    md = write_report(report_of(client, "wide"), tmp_path / "wide")["markdown"].read_text()
    assert "## Declared contrasts" in md and "cannot tell; ~11 seeds would decide equivalence within ±2%" in md
    assert "The 1 contrast the study declared forms the confirmatory family" in md
    md = write_report(report_of(client, "families"), tmp_path / "families")["markdown"].read_text()
    assert "### Declared contrasts by task family (exploratory)" in md
