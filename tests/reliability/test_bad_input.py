"""Bad input the other suites do not cover: corrupt model, adapter and prepared folders, pickle weights, data files
with wrong columns or invalid UTF-8 given to `train`, missing files. Each: one line naming the field, exit 2, no
traceback, no run left RUNNING. (Parameter values: test_config_properties.py, tests/unit/test_config.py and
tests/e2e/*; data files given to `prepare`: tests/unit/test_sources.py, tests/e2e/test_prepare_entrypoint.py.)"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from entrypoints import merge as merge_entry
from entrypoints import train as train_entry
from lora_efficiency.config import TrainConfig, parse_args
from lora_efficiency.errors import UserError
from lora_efficiency.sweep import load_sweep
from tests.reliability.conftest import assert_one_line_error, run_entry_point, statuses

TINY = ["--max_steps", "1", "--batch_size", "2", "--seq_len", "128", "--eval_samples", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """An untrained LoRA adapter of the tiny model (safetensors), made with peft directly."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    folder = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


def broken_model(tiny_model_dir, tmp_path, case: str):
    folder = tmp_path / f"model-{case}"
    shutil.copytree(tiny_model_dir, folder)
    if case == "corrupt safetensors":
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    elif case == "pickle weights only":
        torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    elif case == "corrupt config.json":
        (folder / "config.json").write_text('{"model_type": "llama", ')
    return folder


def test_packing_a_linear_attention_model(store, tiny_model_dir, tiny_data_file, tmp_path, capsys):
    """The tiny model's folder with a Qwen3-Next config: packing is refused from the config, before any weight."""
    from transformers import Qwen3NextConfig

    model = tmp_path / "qwen3-next"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    Qwen3NextConfig(num_hidden_layers=2).save_pretrained(model)
    argv = ["--model", model, "--data", tiny_data_file, "--packing", "true", *TINY]
    code, out, err = run_entry_point(train_entry.main, argv, capsys)
    assert_one_line_error(code, err, "packing=true", f"model='{model}'", "linear_attention layers", "packing=false")
    assert "step 1/" not in out
    assert set(statuses(store)) <= {"FAILED"}


@pytest.mark.parametrize(
    "case, message",
    [
        ("corrupt safetensors", "could not be loaded from"),
        ("pickle weights only", "it holds the pickle file pytorch_model.bin, which is refused"),
        ("corrupt config.json", "could not be loaded from"),
    ],
)
def test_broken_model_folders(case, message, store, tiny_model_dir, tiny_data_file, tmp_path, capsys):
    model = broken_model(tiny_model_dir, tmp_path, case)
    code, out, err = run_entry_point(train_entry.main, ["--model", model, "--data", tiny_data_file, *TINY], capsys)
    assert_one_line_error(code, err, f"model='{model}'", message)
    assert "step 1/" not in out
    assert set(statuses(store)) <= {"FAILED"}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"prompt": "caf\xe9", "response": "x"}\n', "UTF-8"),
        ("cols.csv", b"id,question_text\n1,hi\n2,ho\n", "no prompt/response columns: found id, question_text"),
        ("empty.jsonl", b"", "empty"),
        ("broken.json", b'[{"prompt": "a", "response": ', "JSON"),
    ],
)
def test_bad_data_files_given_to_train(name, content, message, store, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / name
    data.write_bytes(content)
    code, _, err = run_entry_point(train_entry.main, ["--model", tiny_model_dir, "--data", data, *TINY], capsys)
    assert_one_line_error(code, err, "dataset=", message)
    assert statuses(store) == ["FAILED"]


def test_corrupt_prepared_folder(store, tiny_model_dir, tiny_data_file, tmp_path, capsys):
    from lora_efficiency.models import load_tokenizer, resolve_model
    from lora_efficiency.prepare import prepare_data

    source = resolve_model(str(tiny_model_dir))
    prepared = prepare_data(dataset=str(tiny_data_file), model=source, tokenizer=load_tokenizer(source), seq_len=128)
    folder = tmp_path / "prepared"
    shutil.copytree(prepared.path, folder)
    shutil.rmtree(folder / "train")
    code, _, err = run_entry_point(train_entry.main, ["--model", tiny_model_dir, "--data", folder, *TINY], capsys)
    assert_one_line_error(code, err, f"data='{folder}': its train split cannot be read")
    (folder / "manifest.json").write_text("{not json")
    code, _, err = run_entry_point(train_entry.main, ["--model", tiny_model_dir, "--data", folder, *TINY], capsys)
    assert_one_line_error(code, err, "is not a prepared data folder")
    assert statuses(store) == ["FAILED", "FAILED"]


@pytest.mark.parametrize("case", ["corrupt safetensors", "corrupt config", "missing folder", "pickle"])
def test_broken_adapters_given_to_merge(case, tiny_adapter, tiny_model_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    if case != "missing folder":
        shutil.copytree(tiny_adapter, adapter)
    if case == "corrupt safetensors":
        (adapter / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    elif case == "corrupt config":
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "NOPE"}))
    elif case == "pickle":
        (adapter / "adapter_model.safetensors").unlink()
        torch.save({"w": torch.zeros(1)}, adapter / "adapter_model.bin")
    argv = ["--adapter", adapter, "--model", tiny_model_dir, "--output", tmp_path / "out", "--dtype", "fp32"]
    code, _, err = run_entry_point(merge_entry.main, argv, capsys)
    expected = {
        "corrupt safetensors": "could not be loaded",
        "corrupt config": "could not be loaded",
        "missing folder": "is not a folder",
        "pickle": "it holds the pickle file adapter_model.bin, which is refused",
    }[case]
    assert_one_line_error(code, err, f"adapter='{adapter}'", expected)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--defaults", "/does/not/exist.yaml"], "defaults='/does/not/exist.yaml' could not be read as YAML"),
        (["--rank"], "argument --rank: expected one argument"),
        (["--checkpoint_every", "-1"], "checkpoint_every=-1 is invalid: an integer >= 0"),
        (["--resume_from", "/nope"], "resume_from='/nope' is invalid: empty, a train run's id"),
        (["--data", "x" * 5000], "data='xxxx"),
        (["--model", "a\x00b"], "model='a\\x00b' does not exist"),
    ],
)
def test_parameters_missing_files_and_names_the_os_refuses(argv, message):
    with pytest.raises(UserError) as err:
        parse_args(TrainConfig, "train", argv, "")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_resume_from_a_run_that_does_not_exist(store, tiny_model_dir, tiny_data_file, capsys):
    argv = ["--model", tiny_model_dir, "--data", tiny_data_file, "--resume_from", "0" * 32, *TINY]
    code, out, err = run_entry_point(train_entry.main, argv, capsys)
    assert_one_line_error(code, err, f"resume_from='{'0' * 32}' does not exist in the tracking store")
    assert "step 1/" not in out and statuses(store) == ["FAILED"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("base: [rank: 1\n", "could not be read as YAML"),
        (b"\xff\xfe", "could not be read as YAML"),
        ("- 1\n- 2\n", "must hold a mapping, found list"),
        ("axes: {rank: [4]}\nsedes: [0]\n", "unknown key 'sedes'"),
        ("axes: {rank: []}\n", "axes={'rank': []} is invalid"),
    ],
)
def test_corrupt_sweep_files(content, message, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as err:
        load_sweep(path)
    assert message in str(err.value) and "\n" not in str(err.value)
