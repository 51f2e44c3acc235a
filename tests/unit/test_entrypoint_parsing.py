"""plan, generate and merge parse through the typed-config path (bad input: one line, exit 2); the study checks,
like a sweep, that its sweeps share one data set before any run opens; what the sweep backends share."""

from __future__ import annotations

import pytest
import yaml

from entrypoints import generate as generate_entry
from entrypoints import main as main_entry
from entrypoints import merge as merge_entry
from entrypoints import plan as plan_entry
from lora_efficiency.cli import run_cli
from lora_efficiency.config import (
    GenerateConfig,
    MergeConfig,
    PlanConfig,
    TrainConfig,
    build_config,
    parse_args,
    read_defaults,
)
from lora_efficiency.errors import UserError
from lora_efficiency.settings import setting_fields
from lora_efficiency.sweep import Child, Sweep, SweepResult, check_one_data


@pytest.fixture(autouse=True)
def no_run(tmp_path, monkeypatch):
    """A store of this test alone: a parse error must leave it unopened (no file, no run)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield
    assert not (tmp_path / "mlflow.db").exists()


def one_line_error(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_plan_takes_the_train_defaults_and_its_own_section():
    cfg = parse_args(PlanConfig, "plan", [], "")
    train = read_defaults("train")
    own = {"target_fraction", "budget_mb", "design", "spread_experiment", "spread_run_id", "sd"}
    shared = {f.name for f, _ in setting_fields(PlanConfig)} - own
    assert {k: getattr(cfg, k) for k in shared} == {k: getattr(build_config(TrainConfig, train), k) for k in shared}
    assert (cfg.target_fraction, cfg.budget_mb) == (1.0, 0.0)  # every position a target; the machine's memory
    cfg = parse_args(PlanConfig, "plan", ["--rank", "64", "--budget_mb", "24576"], "")
    assert (cfg.rank, cfg.budget_mb) == (64, 24576.0)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--rank", "0", "--budget_mb", "-1"], ["rank=0 is invalid: an integer >= 1", "budget_mb=-1.0 is invalid"]),
        (["--target_fraction", "0"], ["target_fraction=0.0 is invalid: a number in (0, 1]"]),
        (["--double_quant", "maybe"], ["double_quant='maybe' is invalid: true or false"]),
        (["--rnak", "4"], ["unknown argument '--rnak 4'"]),
    ],
)
def test_plan_bad_input(argv, needles, capsys):
    err = one_line_error(plan_entry.main, argv, capsys)
    assert all(n in err for n in needles), err


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--adapter", "none"], ["prompt='' is invalid"]),
        (["--prompt", "hi"], ["run_id='' and adapter='': give exactly one"]),
        (["--run_id", "a" * 32, "--adapter", "none", "--prompt", "hi"], ["give exactly one"]),
        (["--run_id", "xyz", "--prompt", "hi"], ["run_id='xyz' is invalid: an MLflow run id"]),
        (["--adapter", "none", "--prompt", "hi", "--max_new_tokens", "0"], ["max_new_tokens=0 is invalid"]),
        (["--adapter", "none", "--prompt", "hi", "--quantization", "q3"], ["quantization='q3' is invalid"]),
        (["--adapter", "none", "--prompt", "hi", "--device", "tpu"], ["device='tpu' is invalid"]),
    ],
)
def test_generate_bad_input(argv, needles, capsys):
    err = one_line_error(generate_entry.main, argv, capsys)
    assert all(n in err for n in needles), err


def test_generate_and_merge_defaults():
    cfg = parse_args(GenerateConfig, "generate", ["--adapter", "none", "--prompt", "Compute 2 + 2."], "")
    assert (cfg.max_new_tokens, cfg.device, cfg.quantization, cfg.model) == (128, "auto", "", "")
    cfg = parse_args(MergeConfig, "merge", ["--run_id", "a" * 32, "--output", "merged/"], "")
    assert (cfg.dtype, cfg.adapter, cfg.output) == ("bf16", "", "merged/")


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--adapter", "somewhere"], ["output='' is invalid: a new folder"]),
        (["--output", "x"], ["run_id='' and adapter='': give exactly one"]),
        (["--adapter", "somewhere", "--output", "x", "--dtype", "nf4"], ["dtype='nf4' is invalid: bf16, fp16 or fp32"]),
        (["--output"], ["argument --output: expected one argument"]),
    ],
)
def test_merge_bad_input(argv, needles, capsys, tmp_path):
    err = one_line_error(merge_entry.main, argv, capsys)
    assert all(n in err for n in needles), err
    assert not (tmp_path / "x").exists()


def _sweep_file(tmp_path, name: str, **base) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "axes": {"rank": [2]}, "seeds": [0]}))
    return str(path)


def test_a_study_checks_its_sweeps_share_one_data_set_before_any_run(tmp_path, capsys):
    files = ",".join([_sweep_file(tmp_path, "short", seq_len=128), _sweep_file(tmp_path, "long", seq_len=256)])
    err = one_line_error(main_entry.main, ["--profile", "", "--sweeps", files, "--baselines", "fp32"], capsys)
    assert f"sweeps={files!r}: a study prepares its data once" in err
    assert "data, model, seq_len and train_on_prompt must be the same in every configuration" in err


def _sweep(**over) -> Sweep:
    config = build_config(TrainConfig, {**read_defaults("train"), **over})
    return Sweep("s", "s.yaml", [Child("base,seed=0", config, {})], [0])


def test_one_data_set_across_sweeps():
    check_one_data([_sweep(seq_len=128, rank=4), _sweep(seq_len=128, rank=8)], where="x")  # one data set
    with pytest.raises(UserError, match=r"^config='c.yaml': a sweep prepares its data once"):
        check_one_data([_sweep(seq_len=128), _sweep(seq_len=128, train_on_prompt=True)], where="config='c.yaml'")


def test_a_child_is_one_settings_file_that_reproduces_its_config(tmp_path):
    """A sweep child's command line is `--config <file>`: the file parses back into the child's exact config,
    its data the prepared folder; a person can open it and rerun the child."""
    from lora_efficiency.sweep import _job, _Placement

    config = build_config(TrainConfig, {**read_defaults("train"), "num_processes": 2, "device": "cpu", "rank": 8})
    place = _Placement(parent_run_id="p" * 32, experiment_id="0", backend="local", env={})
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    job = _job("s", Child("rank=8,seed=0", config, {"rank": 8}), "k", str(prepared), place, {})
    assert job.num_processes == 2
    path = tmp_path / "settings.yaml"
    path.write_text(job.settings, encoding="utf-8")
    expected = config.replace(data=str(prepared))
    assert parse_args(TrainConfig, "train", ["--config", str(path)], "") == expected


def test_sweep_result_tags_every_count():
    result = SweepResult(5, finished=2, skipped=1, failed=2)
    assert result.tags() == {
        "children_total": "5",
        "children_finished": "2",
        "children_skipped": "1",
        "children_failed": "2",
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--eval_every", "20", "--max_steps", "10"],
            "eval_every=20 is invalid: 0 or an integer from 1 to max_steps=10",
        ),  # noqa: E501
        (["--eval_every", "-1"], "eval_every=-1 is invalid: an integer >= 0"),
        (["--method", "qlora"], "method='qlora' is invalid: one of lora, full"),
        (["--method", "full", "--quantization", "nf4"], "method='full' is invalid with quantization='nf4'"),
        (["--method", "full", "--checkpoint_every", "5", "--quantization", "bf16"], "checkpoints hold LoRA adapters"),
        (["--converge_tol", "0"], "converge_tol=0.0 is invalid: a number in (0, 1)"),
        (["--val_samples", "0"], "val_samples=0 is invalid: an integer >= 1"),
    ],
)
def test_study_settings_of_train_are_checked_at_parse_time(argv, message):
    from lora_efficiency.config import TrainConfig, parse_args
    from lora_efficiency.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_args(TrainConfig, "train", argv, "")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "uri, ok",
    [
        ("runs:/" + "a" * 32 + "/model", True),
        ("models:/study-quick@best-under-3000mb", True),
        ("models:/study-quick/3", True),
        ("models:/study-quick", False),  # neither alias nor version
        ("runs:/xyz/model", False),
    ],
)
def test_run_id_takes_runs_and_models_uris(uri, ok, capsys):
    if ok:
        assert parse_args(GenerateConfig, "generate", ["--run_id", uri, "--prompt", "hi"], "").run_id == uri
    else:
        err = one_line_error(generate_entry.main, ["--run_id", uri, "--prompt", "hi"], capsys)
        assert f"run_id={uri!r} is invalid: an MLflow run id (32 hexadecimal characters), runs:/" in err, err


@pytest.mark.parametrize(
    "settings, name",
    [
        (
            {"rank": 16, "target_modules": "all_linear", "quantization": "nf4", "seed": 0},
            "lora-r16-all_linear-nf4-seed0",
        ),
        (
            {"rank": 8, "target_modules": "q_proj,v_proj", "quantization": "bf16", "seed": 3},
            "lora-r8-q_proj-v_proj-bf16-seed3",
        ),
        (
            {"rank": 4, "target_modules": "attn.c_proj", "quantization": "int8", "seed": 1},
            "lora-r4-attn-c_proj-int8-seed1",
        ),
    ],
)
def test_a_logged_model_is_named_after_its_configuration_and_seed(settings, name):
    """Every model of a study was named `model` in the MLflow UI; a name MLflow accepts and runs:/<id>/<name> parses."""
    from mlflow.utils.validation import _validate_logged_model_name

    from lora_efficiency.mlflow_model import model_name

    assert model_name(**settings) == name
    _validate_logged_model_name(name)  # raises on / : . % " '
    assert parse_args(GenerateConfig, "generate", ["--run_id", f"runs:/{'a' * 32}/{name}", "--prompt", "hi"], "")
