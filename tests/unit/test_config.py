import dataclasses
from typing import get_type_hints

import pytest
import yaml

from lora_efficiency.config import (
    DEFAULTS_FILE,
    EvaluateConfig,
    PrepareConfig,
    ReportConfig,
    StudyConfig,
    SweepConfig,
    TrainConfig,
    convert,
    parse_args,
    read_defaults,
)
from lora_efficiency.errors import ConfigError, UserError

ROOT = DEFAULTS_FILE.parents[1]


def test_defaults_parse_into_a_complete_config():
    cfg = parse_args(TrainConfig, "train", [], "")
    assert cfg.rank == 16 and cfg.quantization == "nf4" and cfg.target_modules == "attention"
    assert cfg.double_quant is True and cfg.packing is True and cfg.lr == pytest.approx(2e-4)


@pytest.mark.parametrize(
    "entry_point, section, cls",
    [
        ("main", "main", StudyConfig),
        ("prepare", "prepare", PrepareConfig),
        ("evaluate", "evaluate", EvaluateConfig),
        ("sweep", "sweep", SweepConfig),
        ("report", "report", ReportConfig),
    ],
)
def test_mlproject_defaults_mirror_default_yaml(entry_point, section, cls):
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    params = project["entry_points"][entry_point]["parameters"]
    defaults = read_defaults(section)
    hints = get_type_hints(cls)
    assert set(params) == {f.name for f in dataclasses.fields(cls)} == set(defaults)
    for name, spec in params.items():  # the same typed value, however YAML spelled it
        assert convert(name, spec["default"], hints[name]) == convert(name, defaults[name], hints[name]), name
    for name in params:
        assert f"--{name} {{{name}}}" in project["entry_points"][entry_point]["command"]


def test_mlproject_train_takes_a_settings_file_and_repeats_no_default():
    """train declares only `config`: every other -P reaches it as --name value (MLflow's undeclared params), so a
    setting not given is the file's or configs/default.yaml's, never a second copy of a default."""
    train = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["train"]
    assert train["parameters"] == {"config": {"type": "string", "default": ""}}
    assert train["command"] == "python -m entrypoints.train --config {config}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "rank=0 is invalid: an integer >= 1"),
        (["--rank", "-1"], "rank=-1 is invalid: an integer >= 1"),
        (["--rank", "abc"], "rank='abc' is invalid: an integer"),
        (["--rank", "2.5"], "rank='2.5' is invalid: an integer"),
        (["--lr", "fast"], "lr='fast' is invalid: a number"),
        (["--lr", "nan"], "lr='nan' is invalid: a finite number"),
        (["--dropout", "1.0"], "dropout=1.0 is invalid: a number in [0, 1)"),
        (["--quantization", "q3"], "quantization='q3' is invalid: one of nf4, fp4, int8, bf16, fp16, fp32"),
        (["--target_modules", "q v"], "target_modules='q v' is invalid: one of q_v, q_k_v, attention"),
        (["--packing", "maybe"], "packing='maybe' is invalid: true or false"),
        (["--device", "tpu"], "device='tpu' is invalid: auto, cpu, cuda or cuda:N"),
        (["--model", "/does/not/exist"], "model='/does/not/exist' does not exist"),
        (["--data", "/does/not/exist"], "data='/does/not/exist' is invalid: '' (the bundled set), a known set"),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(args, message):
    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, "train", args, "")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_args(
            TrainConfig, "train", ["--rank", "abc", "--quantization", "q3", "--seq_len", "8", "--model", "/nope"], ""
        )
    assert [p.split("=")[0] for p in err.value.problems] == ["rank", "seq_len", "quantization", "model"]


def test_unknown_argument_lists_the_allowed_ones():
    with pytest.raises(UserError, match="unknown argument '--rnak 4': allowed are --defaults, --config and"):
        parse_args(TrainConfig, "train", ["--rnak", "4"], "")


def test_booleans_and_a_config_file(tmp_path):
    section = read_defaults("train") | {"rank": 8, "packing": "no"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": section}))
    cfg = parse_args(TrainConfig, "train", ["--defaults", str(path), "--use_dora", "TRUE"], "")
    assert (cfg.rank, cfg.packing, cfg.use_dora) == (8, False, True)


def test_corrupt_yaml_is_a_one_line_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [rank: 1\n")
    with pytest.raises(UserError, match=r"defaults='.*bad.yaml' could not be read as YAML"):
        parse_args(TrainConfig, "train", ["--defaults", str(path)], "")


def test_report_settings_are_checked():
    with pytest.raises(ConfigError) as err:
        parse_args(ReportConfig, "report", ["--sweep_run_id", "abc", "--budgets_mb", "4000,lots"], "")
    assert [p.split("=")[0] for p in err.value.problems] == ["sweep_run_id", "budgets_mb"]
    cfg = parse_args(ReportConfig, "report", ["--budgets_mb", "4000, 8000.5"], "")
    assert cfg.budgets_mb == "4000, 8000.5" and cfg.experiment == ""


def test_a_settings_file_sits_between_the_defaults_and_the_flags(tmp_path):
    from lora_efficiency.config import settings_text

    recorded = parse_args(TrainConfig, "train", ["--rank", "8", "--lr", "1e-3", "--packing", "false"], "")
    path = tmp_path / "settings.yaml"
    path.write_text(settings_text(recorded, {"base_model_revision": "local-abc"}), encoding="utf-8")
    assert parse_args(TrainConfig, "train", ["--config", str(path)], "") == recorded  # every value, exactly
    changed = parse_args(TrainConfig, "train", ["--config", str(path), "--rank", "4"], "")
    assert changed == recorded.replace(rank=4)  # a flag given beside the file wins


@pytest.mark.parametrize(
    "text, message",
    [
        ("rank: 8\n", "config='{}' is invalid: a settings file holds a `train` mapping"),
        ("train:\n  rnak: 8\n", "unknown setting 'rnak'"),
        ("train:\n  rank: 0\n", "rank=0 is invalid: an integer >= 1"),
        ("- 1\n", "config='{}' must hold a mapping, found list"),
    ],
)
def test_a_bad_settings_file_is_one_line(tmp_path, text, message):
    path = tmp_path / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as err:
        parse_args(TrainConfig, "train", ["--config", str(path)], "")
    assert message.format(path) in str(err.value) and "\n" not in str(err.value)
