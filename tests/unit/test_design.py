"""A study's design: declared contrasts as a profile states them, and the power and seeds of each."""

from __future__ import annotations

import math

import pytest

from lora_efficiency.design import EQUIVALENCE, contrast_power, parse_contrasts, seeds_needed
from lora_efficiency.errors import ConfigError
from tests.report_store import CONTRAST

# issue 28: docs/results-v2.md's LoRA vs full FT interval 1.017 [0.980, 1.055], 3 pairs -> paired sd of ln ppl 0.0148
SD = 0.0148


def test_three_seeds_give_a_two_percent_tost_about_a_quarter_power():
    assert contrast_power(SD, 3, 0.02, "equivalence") == pytest.approx(0.26, abs=0.01)


def test_seven_seeds_for_one_equivalence_contrast_nine_with_holm_over_three():
    assert seeds_needed(SD, 0.02, "equivalence") == 7
    assert contrast_power(SD, 6, 0.02, "equivalence") < 0.8 <= contrast_power(SD, 7, 0.02, "equivalence")
    assert seeds_needed(SD, 0.02, "equivalence", 3) == 9


def test_three_seeds_already_detect_a_five_percent_difference():
    assert contrast_power(SD, 3, 0.05, "difference") >= 0.8
    assert seeds_needed(SD, 0.05, "difference") == 3


def test_a_noise_floor_that_seeds_cannot_reduce_can_make_a_margin_undecidable():
    # an evaluation standard error of 0.012 (ln scale) alone: 1.645 x 0.012 = 0.0197 of the 0.0198 half-band
    assert seeds_needed(SD, 0.02, EQUIVALENCE, floor=0.012) is None
    assert contrast_power(SD, 9, 0.02, EQUIVALENCE, floor=0.003) < contrast_power(SD, 9, 0.02, EQUIVALENCE)


def test_a_difference_test_matches_the_noncentral_t():
    from scipy import stats

    n, theta = 5, math.log1p(0.03)
    ncp, t = theta / (SD / n**0.5), stats.t.ppf(0.975, n - 1)
    expected = stats.nct.sf(t, n - 1, ncp) + stats.nct.cdf(-t, n - 1, ncp)
    assert contrast_power(SD, n, 0.03, "difference") == pytest.approx(expected, abs=1e-6)


def test_a_declared_contrast_parses_with_the_default_metric():
    (c,) = parse_contrasts([CONTRAST])
    assert c.a == {"rank": "4", "target_modules": "all_linear"} and c.metric == "eval/perplexity"
    assert c.describe() == "equivalence within ±2%"
    assert parse_contrasts(None) == []


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("test", "equal", "contrasts[0].test='equal' is invalid: one of equivalence, difference"),
        ("margin", 2, "contrasts[0].margin=2 is invalid: a ratio in (0, 1)"),
        ("margin", True, "contrasts[0].margin=True is invalid"),
        ("metric", "eval/loss", "contrasts[0].metric='eval/loss' is invalid: one of eval/perplexity"),
        ("a", "r4", "contrasts[0].a='r4' is invalid: a mapping of settings"),
        ("b", CONTRAST["a"], "contrasts[0].b="),
        ("colour", "red", "contrasts[0].colour='red' is invalid: one of name, a, b"),
    ],
)
def test_a_bad_contrast_field_is_named_with_its_value_and_what_is_allowed(field, value, named):
    with pytest.raises(ConfigError) as caught:
        parse_contrasts([{**CONTRAST, field: value}], where="profile='standard'")
    assert named in str(caught.value) and "profile='standard'" in str(caught.value)


def test_a_setting_a_contrast_cannot_match_is_refused():
    with pytest.raises(ConfigError, match=r"contrasts\[0\].a.colour='x' is invalid: a setting"):
        parse_contrasts([{**CONTRAST, "a": {"colour": "x"}}], settings=("rank", "target_modules"))


def test_a_study_refuses_a_contrast_naming_a_configuration_its_sweeps_do_not_train(monkeypatch):
    import lora_efficiency.study as study
    from lora_efficiency.sweep import load_sweep

    sweeps = [load_sweep("configs/sweeps/rank.yaml", profile="quick")]  # ranks 4 to 64 on attention
    declared = {**CONTRAST, "a": {"rank": 4}, "b": {"rank": 16}}
    monkeypatch.setattr(study, "load_profile", lambda name: {"contrasts": [declared]})
    (c,) = study.study_contrasts("quick", sweeps)
    assert c.a == {"rank": "4"}
    monkeypatch.setattr(study, "load_profile", lambda name: {"contrasts": [{**declared, "b": {"rank": 3}}]})
    with pytest.raises(ConfigError, match=r"profile='quick': contrasts\[0\].b=\{'rank': '3'\} is invalid: settings"):
        study.study_contrasts("quick", sweeps)


def _exit_2(argv: list[str], capsys) -> str:
    from entrypoints import plan
    from lora_efficiency.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(plan.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_plan_design_needs_a_spread_and_a_profile_with_contrasts(capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/never-opened.db")
    assert "design='quick' needs a spread: --sd" in _exit_2(["--design", "quick"], capsys)
    assert "design='nope' is invalid: empty (plan memory) or a profile" in _exit_2(
        ["--design", "nope", "--sd", "0.01"], capsys
    )
    assert "sd=2.0 is invalid" in _exit_2(["--design", "quick", "--sd", "2"], capsys)
    assert "the profile declares no contrasts" in _exit_2(["--design", "quick", "--sd", "0.01"], capsys)


def test_plan_design_prints_the_seeds_of_each_declared_contrast(capsys, monkeypatch):
    import lora_efficiency.sweep as sweep
    from entrypoints import plan

    monkeypatch.setattr(sweep, "load_profile", lambda name: {"contrasts": [CONTRAST], "seeds": [0, 1, 2]})
    plan.main(["--design", "quick", "--sd", "0.0148"])
    out = capsys.readouterr().out
    assert "1 declared contrasts, Holm over 1" in out and "the profile runs 3 seeds" in out
    assert "paired sd 0.0148 (given (--sd)); 7 seeds give 80% power; the profile's 3 seeds: power 0.26" in out, out
