"""Property-based tests of the config parser (hypothesis): whatever the values, parse_args/build_config either
return a config or raise one UserError whose message is one line naming the field; never another exception."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_efficiency.config import (
    EvaluateConfig,
    PrepareConfig,
    StudyConfig,
    SweepConfig,
    TrainConfig,
    build_config,
    convert,
    parse_args,
    read_defaults,
)
from lora_efficiency.errors import ConfigError, UserError
from lora_efficiency.settings import setting_fields

SECTIONS = {
    TrainConfig: "train",
    PrepareConfig: "prepare",
    EvaluateConfig: "evaluate",
    SweepConfig: "sweep",
    StudyConfig: "main",
}
FIELDS = {cls: [f.name for f, _ in setting_fields(cls)] for cls in SECTIONS}
# anything a user could type or a YAML file could hold: text of any script, empty, huge, numbers, None, lists
VALUES = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=300, max_size=1000),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.sampled_from(["", " ", "nan", "inf", "-0", "1e309", "0x10", "1_000", "true", "TRUE", "no", "cuda:99"]),
)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line_naming_fields(exc: ConfigError, cls) -> None:
    assert "\n" not in str(exc) and "Traceback" not in str(exc)
    for problem in exc.problems:  # every problem starts with the field it is about
        assert re.match(rf"({'|'.join(FIELDS[cls])})\b|unknown setting", problem), problem


@pytest.mark.parametrize("cls", list(SECTIONS), ids=lambda c: c.__name__)
@PROPERTY
@given(data=st.data())
def test_any_values_give_a_config_or_one_line_per_field(cls, data):
    defaults = read_defaults(SECTIONS[cls])
    changed = data.draw(st.dictionaries(st.sampled_from(FIELDS[cls]), VALUES, max_size=4))
    try:
        build_config(cls, {**defaults, **changed})
    except ConfigError as exc:
        one_line_naming_fields(exc, cls)


@PROPERTY
@given(argv=st.lists(st.one_of(st.sampled_from([f"--{n}" for n in FIELDS[TrainConfig]]), st.text(max_size=12))))
def test_any_command_line_is_a_config_or_one_user_error(argv):
    try:
        parse_args(TrainConfig, "train", argv, "")
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc)


@PROPERTY
@given(value=st.integers())
def test_integers_round_trip(value):
    """Integers of up to 18 digits (int64, what torch, numpy and SQLite take) round-trip; longer ones are one
    problem naming the field, never Python's ValueError (4,300+ digits) or an overflow later."""
    if abs(value) < 10**18:
        assert convert("rank", str(value), int) == (value, None)
        assert convert("rank", f" {value} ", int) == (value, None)
    else:
        converted, problem = convert("rank", str(value), int)
        assert converted is None and problem.startswith("rank=") and "at most 18 digits" in problem


@PROPERTY
@given(text=st.text(max_size=20).filter(lambda s: not re.fullmatch(r"\s*[+-]?\d+\s*", s)))
def test_non_integers_name_the_field(text):
    value, problem = convert("max_steps", text, int)
    assert value is None and problem.startswith("max_steps=") and "an integer" in problem


@PROPERTY
@given(value=st.floats())
def test_floats_are_finite_or_refused(value):
    converted, problem = convert("lr", repr(value), float)
    if math.isfinite(value):
        assert converted == value and problem is None
    else:
        assert converted is None and problem.startswith("lr=") and "a finite number" in problem


@PROPERTY
@given(word=st.sampled_from(["true", "1", "yes", "on", "false", "0", "no", "off"]), data=st.data())
def test_booleans_in_any_case(word, data):
    cased = "".join(data.draw(st.sampled_from([c.lower(), c.upper()])) for c in word)
    assert convert("packing", cased, bool) == (word in ("true", "1", "yes", "on"), None)


@PROPERTY
@given(value=st.integers())
def test_integer_ranges_hold_for_every_value(value):
    values = {**read_defaults("train"), "rank": value, "seq_len": value}
    try:
        cfg = build_config(TrainConfig, values)
    except ConfigError as exc:
        assert not (1 <= value <= 4096 and 16 <= value <= 131072)
        assert any(p.startswith(("rank=", "seq_len=")) for p in exc.problems)
    else:
        assert 16 <= cfg.seq_len <= 4096 and cfg.rank == value


def test_every_field_has_a_converter():
    for cls in SECTIONS:
        assert {kind for _, kind in setting_fields(cls)} <= {str, int, float, bool}, cls
