"""Secrets stay out of the tracking store; paths from parameters write only inside the folders they name; pickle
files are refused; trust_remote_code is off by default; `make ui` binds 127.0.0.1."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from entrypoints import merge as merge_entry
from entrypoints import prepare as prepare_entry
from entrypoints import train as train_entry
from lora_efficiency.config import DEFAULTS_FILE, EvaluateConfig, PrepareConfig, TrainConfig
from lora_efficiency.redaction import redact
from lora_efficiency.settings import setting_fields
from tests.reliability.conftest import assert_one_line_error, run_entry_point, statuses

ROOT = DEFAULTS_FILE.parents[1]
ENV_TOKEN = "hf_EnvTokenAbCdEfGhIjKlMnOpQrStUvWxYz012"  # the shape of a Hugging Face access token
PARAM_TOKEN = "hf_ParamTokenZyXwVuTsRqPoNmLkJiHgFeDcBa98"
TINY = ["--max_steps", "2", "--batch_size", "2", "--seq_len", "128", "--eval_samples", "2", "--device", "cpu"]


def files_holding(folder: Path, *secrets: str) -> list[str]:
    """Every file under `folder` (the SQLite store, the artifacts) whose bytes contain one of `secrets`."""
    return [str(f) for f in folder.rglob("*") if f.is_file() and any(s.encode() in f.read_bytes() for s in secrets)]


def test_redact_masks_tokens_and_secret_variables(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "my-own-secret-value")
    assert redact(f"a {PARAM_TOKEN} b") == "a hf_*** b"
    assert redact("x my-own-secret-value y") == "x *** y"
    assert redact("sk-abcdefghijklmnopqrstu ghp_abcdefghijklmnopqrstuvwxyz") == "sk-*** ghp_***"
    assert redact("q_proj,hf_short,/tmp/x") == "q_proj,hf_short,/tmp/x"  # short names are not tokens


def test_no_param_tag_or_artifact_holds_a_secret(store, tiny_model_dir, tiny_data_file, tmp_path, monkeypatch, capsys):
    """HF_TOKEN in the environment, a token-like value in a parameter (the data file's folder): a finished run and a
    failed one, then every byte of the store and the artifacts is searched for either token."""
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    data = tmp_path / PARAM_TOKEN / "tiny.jsonl"
    data.parent.mkdir()
    shutil.copy(tiny_data_file, data)
    argv = ["--model", tiny_model_dir, "--data", data, "--generate_samples", "2", "--max_new_tokens", "2", *TINY]
    code, _, err = run_entry_point(train_entry.main, argv, capsys)
    assert code == 0, err[-2000:]
    code, _, err = run_entry_point(train_entry.main, [*argv, "--target_modules", ENV_TOKEN], capsys)
    line = assert_one_line_error(code, err, "target_modules='***'")
    assert ENV_TOKEN not in line
    assert sorted(statuses(store)) == ["FAILED", "FINISHED"]

    runs = store.search_runs([store.get_experiment_by_name("reliability").experiment_id])
    for run in runs:
        for name, value in {**run.data.params, **run.data.tags}.items():
            assert ENV_TOKEN not in value and PARAM_TOKEN not in value, name
    finished = next(r for r in runs if r.info.status == "FINISHED")
    assert "hf_***" in finished.data.params["data"]  # logged, redacted
    assert {"adapter", "config.json", "memory_trace.csv"} <= {
        f.path for f in store.list_artifacts(finished.info.run_id)
    }
    assert files_holding(tmp_path, ENV_TOKEN, PARAM_TOKEN) == []  # mlflow.db and every artifact byte


def test_merge_writes_only_inside_its_output(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(adapter)
    sandbox = tmp_path / "sandbox" / "inner"
    sandbox.mkdir(parents=True)
    monkeypatch.chdir(sandbox)
    before = {p for p in tmp_path.rglob("*")}
    argv = ["--adapter", adapter, "--model", tiny_model_dir, "--output", "../merged", "--dtype", "fp32"]
    code, _, err = run_entry_point(merge_entry.main, argv, capsys)
    assert code == 0, err
    new = {p for p in tmp_path.rglob("*")} - before
    merged = (sandbox / "../merged").resolve()
    assert new and all(p == merged or merged in p.parents for p in new), sorted(map(str, new))
    code, _, err = run_entry_point(merge_entry.main, argv, capsys)  # never into a folder that holds files
    assert_one_line_error(code, err, "output='../merged' exists and is not empty: choose a new folder")


def test_prepare_writes_only_into_the_cache(store, tiny_model_dir, tiny_data_file, tmp_path, capsys):
    """A data file named like a path escape still lands in one new folder of the cache (its name is sanitised)."""
    data = tmp_path / "..evil name;$(x).jsonl"
    shutil.copy(tiny_data_file, data)
    cache = Path(os.environ["LORA_EFFICIENCY_CACHE"])
    (cache / "data").mkdir(exist_ok=True)
    before_data, before_tmp = set((cache / "data").iterdir()), set(tmp_path.rglob("*"))
    code, _, err = run_entry_point(prepare_entry.main, ["--dataset", data, "--model", tiny_model_dir], capsys)
    assert code == 0, err
    (folder,) = set((cache / "data").iterdir()) - before_data
    assert folder.resolve().parent == (cache / "data").resolve() and folder.name.startswith("..evil_name___x_-")
    new = set(tmp_path.rglob("*")) - before_tmp  # the tracking store (its creation lock too), artifacts, nothing else
    assert all(
        p.name in ("mlflow.db", "mlflow.db.lock") or (tmp_path / "work") in p.parents or p == tmp_path / "work"
        for p in new
    ), new


def test_pickle_model_and_adapter_files_are_refused(tiny_model_dir, tmp_path):
    import torch

    from lora_efficiency.errors import UserError
    from lora_efficiency.inference import check_adapter_folder
    from lora_efficiency.models import load_base_model, resolve_model

    torch.save({"w": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="it holds the pickle file adapter_model.bin, which is refused"):
        check_adapter_folder(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()
    torch.save({}, model / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin, which is refused: models load from safetensors only"):
        load_base_model(resolve_model(str(model)), quantization="fp32", double_quant=False, device=torch.device("cpu"))


def test_trust_remote_code_is_off_unless_set():
    from lora_efficiency import inference, models, planner, trainer

    defaults = yaml.safe_load(DEFAULTS_FILE.read_text())
    project = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    for cls, section in ((TrainConfig, "train"), (PrepareConfig, "prepare"), (EvaluateConfig, "evaluate")):
        assert "trust_remote_code" in {f.name for f, _ in setting_fields(cls)}
        assert defaults[section]["trust_remote_code"] is False
        if section != "train":  # train's MLproject entry declares only `config`: its defaults are default.yaml's
            assert project[section]["parameters"]["trust_remote_code"]["default"] == "false"
    for fn in (models.load_tokenizer, models.load_base_model, inference.load_for_inference, planner.predict_peak_mb):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__
    # train() takes its settings from the defaults file unless told otherwise
    assert trainer.train_settings(model=models.resolve_model("smollm2-135m")).trust_remote_code is False


@pytest.mark.parametrize("extra, host", [([], "127.0.0.1"), (["HOST=0.0.0.0"], "0.0.0.0")])
def test_make_ui_binds_localhost_unless_told(extra, host):
    out = subprocess.run(
        ["make", "-n", "-o", ".venv/.setup-done", "ui", *extra], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    (line,) = [ln for ln in out.stdout.splitlines() if "mlflow ui" in ln]
    assert f"--host {host} " in line
