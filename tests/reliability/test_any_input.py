"""Round two of bad input: whatever the value, its size or its type, an entry point ends in one `error:` line and
exit status 2, no traceback, no run left RUNNING. Sizes (5,000-digit integers, seeds above 2^64, cuda:<20 digits>,
alpha=1e300), outputs that are devices or names the OS refuses, data files holding JSON null, a seq_len that leaves
no target token, a model with fewer positions than seq_len or generation needs, and anything no check foresaw
(run_cli: one line, the traceback in a log file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from entrypoints import prepare as prepare_entry
from entrypoints import train as train_entry
from lora_efficiency.cli import run_cli
from lora_efficiency.config import CHECKS, DEFAULTS_FILE, ReportConfig, TrainConfig, parse_args
from lora_efficiency.errors import ConfigError, UserError
from lora_efficiency.settings import setting_fields
from tests.conftest import subprocess_env
from tests.reliability.conftest import assert_one_line_error, run_entry_point, statuses

ROOT = DEFAULTS_FILE.parents[1]
TINY = ["--max_steps", "1", "--batch_size", "2", "--seq_len", "128", "--eval_samples", "2", "--device", "cpu"]
# each entry point's section of configs/default.yaml: its config's name, but `main` for the study's
SECTIONS = {
    cls: "main" if cls.__name__ == "StudyConfig" else cls.__name__.removesuffix("Config").lower() for cls in CHECKS
}


def problems_of(cls: type, argv: list[str]) -> str:
    with pytest.raises(UserError) as err:
        parse_args(cls, SECTIONS[cls], argv, "")
    return str(err.value)


@pytest.mark.parametrize("cls", list(CHECKS), ids=lambda c: c.__name__)
def test_integers_of_any_size_are_one_problem_naming_the_field(cls):
    """Every integer field of every entry point: 5,000 digits (Python refuses to parse 4,300+), 2^64 + 1."""
    fields = [f.name for f, kind in setting_fields(cls) if kind is int]
    for name in fields:
        for value in ("9" * 5000, "-" + "9" * 5000, str(2**64 + 1)):
            message = problems_of(cls, [f"--{name}", value])
            assert f"{name}=" in message and "at most 18 digits" in message, message[:300]
            assert len(message) < 2000 and "\n" not in message  # the value is named, not echoed in full


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--seed", str(2**32)], "seed=4294967296 is invalid: an integer from 0 to 4294967295"),
        (["--seed", str(2**64 + 1)], "seed='18446744073709551617' is invalid: an integer of at most 18 digits"),
        (["--device", "cuda:" + "9" * 20], "device='cuda:99999999999999999999' is invalid"),
        (["--alpha", "1e300"], "alpha=1e+300 is invalid: a number in (0, 65536]"),
        (["--weight_decay", "1e300"], "weight_decay=1e+300 is invalid: a number from 0 to 100"),
        (["--lr", "1e-400"], "lr=0.0 is invalid"),
        (["--num_processes", "99999999"], "num_processes=99999999 is invalid: an integer from 1 to 256"),
    ],
)
def test_sizes_beyond_what_torch_takes_are_refused_when_parsed(argv, needle):
    assert needle in problems_of(TrainConfig, argv)


def test_a_defaults_file_with_a_huge_integer(tmp_path):
    defaults = yaml.safe_load(DEFAULTS_FILE.read_text())
    defaults["train"]["seed"] = 10**30
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(defaults))
    assert f"seed={10**30} is invalid: an integer of at most 18 digits" in problems_of(
        TrainConfig, ["--defaults", str(tmp_path / "d.yaml")]
    )
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(defaults).replace(str(10**30), "9" * 5000))
    assert "could not be read as YAML" in problems_of(TrainConfig, ["--defaults", str(tmp_path / "d.yaml")])


def test_cuda_index_beyond_the_machine_is_refused_before_a_run():
    from lora_efficiency.devices import resolve_device

    with pytest.raises(UserError, match="cuda:999"):
        resolve_device("cuda:999")


@pytest.mark.parametrize(
    "output",
    ["/dev/null", "x" * 300, "reports/" + "y" * 256 + "/z", "a\x00b"],
    ids=["device", "long-name", "long-component", "nul"],
)
def test_outputs_that_cannot_be_folders(output):
    message = problems_of(ReportConfig, ["--output", output])
    assert message.startswith("output=") and "a folder" in message and "\n" not in message


def test_anything_unforeseen_is_one_line_and_its_traceback_in_the_log(store, tmp_path, monkeypatch, capsys):
    """The catch-all of run_cli: an exception no check turned into a UserError (here OSError and RuntimeError,
    with a secret in the message) ends as one redacted line, exit 2, the run FAILED, the traceback in the log."""
    log = tmp_path / "cli.log"
    monkeypatch.setenv("LORA_EFFICIENCY_LOG", str(log))
    monkeypatch.setenv("HF_TOKEN", "tok-12345")

    def main(argv):
        mlflow.set_experiment("reliability")
        mlflow.start_run()
        raise OSError(36, "File name too long", "/data/tok-12345/" + "n" * 300)

    code, _, err = run_entry_point(main, [], capsys)
    line = assert_one_line_error(code, err, "OSError: [Errno 36] File name too long", f"traceback in {log}")
    assert "tok-12345" not in line and "tok-12345" not in log.read_text()
    assert "Traceback (most recent call last)" in log.read_text() and statuses(store) == ["FAILED"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("null", "record 1 holds null, not an object"),
        ("[null]", "record 1 holds null, not an object"),
        ("5", "record 1 holds int"),
        ('{"prompt": "a", "response": "b"}\n"text"\n', "line 2 holds str, not an object"),
    ],
)
def test_data_files_holding_json_values_that_are_not_records(content, message, store, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "odd.jsonl"
    data.write_text(content)
    code, _, err = run_entry_point(train_entry.main, ["--model", tiny_model_dir, "--data", data, *TINY], capsys)
    assert_one_line_error(code, err, f"dataset='{data}'", message)
    assert statuses(store) == ["FAILED"]


def test_json_null_data_file_in_a_process_of_its_own(tmp_path, tiny_model_dir):
    """The case that was exit 139 (pyarrow crashed the process, no message, the run left RUNNING)."""
    data = tmp_path / "null.json"
    data.write_text("null")
    argv = ["--model", str(tiny_model_dir), "--data", str(data), *TINY]
    env = subprocess_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", MLFLOW_EXPERIMENT_NAME="null", PYTHONPATH=str(ROOT)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.train", *argv], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert_one_line_error(proc.returncode, proc.stderr, "record 1 holds null")
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("null").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_data_file_name_as_long_as_the_os_allows(store, tiny_model_dir, tiny_data_file, tmp_path, capsys):
    """A 245-character stem: the prepared folder's name (stem + key) used to pass NAME_MAX (OSError)."""
    data = tmp_path / ("d" * 245 + ".jsonl")
    data.write_bytes(tiny_data_file.read_bytes())
    code, _, err = run_entry_point(
        prepare_entry.main, ["--dataset", data, "--model", tiny_model_dir, "--seq_len", "64"], capsys
    )
    assert code == 0, err[-2000:]
    made = [f.name for f in (Path(os.environ["LORA_EFFICIENCY_CACHE"]) / "data").iterdir() if f.name.startswith("ddd")]
    assert len(made) == 1 and made[0].startswith("d" * 100 + "-") and len(made[0]) <= 255


def test_seq_len_that_leaves_no_target_token_is_said_before_training(store, tiny_model_dir, tiny_data_file, capsys):
    """seq_len=16 is shorter than SmolLM2's chat template before the answer: every response is truncated away
    (was: "element 0 of tensors does not require grad" from backward)."""
    argv = ["--model", tiny_model_dir, "--data", tiny_data_file, *TINY, "--seq_len", "16", "--packing", "false"]
    code, out, err = run_entry_point(train_entry.main, argv, capsys)
    assert_one_line_error(code, err, "seq_len=16 leaves no target token", "raise seq_len")
    assert "step 1/" not in out and statuses(store) == ["FAILED"]


def test_a_micro_batch_without_target_backpropagates_zero(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_efficiency.loss import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.arange(1, 9).unsqueeze(0)
    batch = {"input_ids": ids, "labels": torch.full_like(ids, -100), "position_ids": torch.arange(8).unsqueeze(0)}
    loss, count = token_loss_sum(model, batch)
    loss.backward()
    assert count == 0 and loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A GPT-2-style model (learned positions, 96 of them) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=32, n_layer=1, n_head=2)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_seq_len_beyond_a_models_positions_is_refused_before_training(store, tiny_gpt2_dir, tiny_data_file, capsys):
    argv = ["--model", tiny_gpt2_dir, "--data", tiny_data_file, *TINY, "--target_modules", "c_attn"]
    code, out, err = run_entry_point(train_entry.main, argv, capsys)
    assert_one_line_error(code, err, "seq_len=128 is invalid for model=", "at most its 96 positions")
    assert "step 1/" not in out and statuses(store) == ["FAILED"]


def test_generation_past_a_models_positions_is_clamped(tiny_gpt2_dir):
    """GPT-2's learned table ends at n_positions: generate() past it was IndexError after training finished."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_efficiency.evaluation import generate_answers

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    prompts = ["What is 2 + 2?", "word " * 200]  # a short prompt, and one longer than the model's positions
    answers, _ = generate_answers(
        model, tokenizer, prompts, max_new_tokens=200, batch_size=2, device=torch.device("cpu"), autocast_dtype=None
    )
    assert len(answers) == 2 and all(len(tokenizer(a)["input_ids"]) <= 96 for a in answers)


def test_one_line_when_run_as_a_script(tmp_path):
    """A 5,000-digit rank through the real entry point (argv, exit status): exit 2, no traceback."""
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from entrypoints.train import main; from lora_efficiency.cli import run_cli; run_cli(main)",
            "--rank",
            "9" * 5000,
            "--seed",
            str(2**70),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert_one_line_error(proc.returncode, proc.stderr, "rank=", "seed=")
    assert len(proc.stderr) < 3000


def test_every_entry_point_goes_through_run_cli():
    for script in (ROOT / "entrypoints").glob("*.py"):
        if script.name != "__init__.py":
            assert "run_cli(main)" in script.read_text(), script.name
    assert ConfigError.__mro__[1] is UserError and run_cli.__module__ == "lora_efficiency.cli"
