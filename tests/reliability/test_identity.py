"""A local model is identified by its content: other weights in a folder of the same name are another revision,
another config_hash, and no checkpoint of the first resumes on them. The weights' digest is computed once per file
version (cached)."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from entrypoints import train as train_entry
from lora_efficiency import models
from lora_efficiency.models import resolve_model
from tests.conftest import tiny_sweep_base
from tests.reliability.conftest import assert_one_line_error, run_entry_point, statuses

TINY = ["--batch_size", "2", "--seq_len", "128", "--eval_samples", "2", "--generate_samples", "0", "--device", "cpu"]


def retrain_in_place(folder: Path) -> None:
    """Other weights of the same architecture: same names, shapes and file size (what a retrained model is)."""
    weights = load_file(str(folder / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1.0
    size = (folder / "model.safetensors").stat().st_size
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert (folder / "model.safetensors").stat().st_size == size


def test_other_weights_under_the_same_name_are_another_revision(tiny_model_dir, tmp_path):
    """Was: the revision hashed the JSON files and the weights' names and sizes, equal for retrained weights."""
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, folder)
    before = resolve_model(str(folder))
    retrain_in_place(folder)
    after = resolve_model(str(folder))
    assert before.model_id == after.model_id == "my-model"
    assert before.revision != after.revision and after.revision.startswith("local-")
    shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert resolve_model(str(tmp_path / "copy")).revision == before.revision  # the same content: the same identity


def test_the_digest_is_computed_once_per_file_version(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    opened = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        if self.suffix == ".safetensors":
            opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    first = resolve_model(str(folder)).revision
    assert resolve_model(str(folder)).revision == first and opened == ["model.safetensors"]  # the second: cached
    retrain_in_place(folder)
    assert resolve_model(str(folder)).revision != first and opened == ["model.safetensors"] * 2
    assert (models.cache_root() / "digests.json").is_file()


def test_a_checkpoint_does_not_resume_on_other_weights(store, tiny_model_dir, tiny_data_file, tmp_path, capsys):
    folder = tmp_path / "base"
    shutil.copytree(tiny_model_dir, folder)
    argv = ["--model", folder, "--data", tiny_data_file, *TINY]
    code, _, err = run_entry_point(train_entry.main, [*argv, "--max_steps", "2", "--checkpoint_every", "1"], capsys)
    assert code == 0, err[-2000:]
    checkpoint = sorted(Path.cwd().rglob("checkpoints/step-000001"))[0]
    retrain_in_place(folder)
    code, out, err = run_entry_point(train_entry.main, [*argv, "--max_steps", "3", "--resume_from", checkpoint], capsys)
    assert_one_line_error(code, err, "was trained with other settings", "resume with the same settings")
    assert "step 2/" not in out and statuses(store) == ["FAILED", "FINISHED"]


def main_keys(model: str, data_file: Path, tmp_path: Path) -> tuple[list[str], object]:
    """The sweep_keys a sweep over `model` gives its main runs, as sweep.py computes them (nothing is trained), and
    its one child's config."""
    import yaml

    from lora_efficiency import sweep as sweep_mod

    spec = {"name": "identity", "base": tiny_sweep_base(Path(model), data_file), "axes": {"rank": [2]}, "seeds": [0]}
    path = tmp_path / "identity.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = sweep_mod.load_sweep(path)
    phase = sweep_mod._Phase(sweep, None, "fp", "", "", None, None, {}, None)
    keys: list[str] = []
    phase.submit = lambda todo, pilot=False: keys.extend(key for _, key, _ in todo) or {}
    sweep_mod._run_main(phase, {})
    return keys, sweep.children[0].config


def test_a_restarted_sweep_does_not_skip_a_child_whose_local_weights_were_replaced(
    tiny_model_dir, tiny_data_file, tmp_path
):
    """Was: the sweep_key held the folder's path, so a sweep started again after the weights in that folder were
    replaced skipped the child as FINISHED."""
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, folder)
    before, _ = main_keys(str(folder), tiny_data_file, tmp_path)
    assert main_keys(str(folder), tiny_data_file, tmp_path)[0] == before  # unchanged weights: skipped as FINISHED
    retrain_in_place(folder)
    after, _ = main_keys(str(folder), tiny_data_file, tmp_path)
    assert len(before) == len(after) == 1 and after != before


def test_a_hub_models_sweep_key_is_unchanged(tiny_data_file, tmp_path):
    """Keys stored before the revision entered (bundled and hub models) stay valid: no revision, no new field."""
    from lora_efficiency.configuration import sweep_key

    (key,), config = main_keys("meta-llama/Llama-3.2-1B", tiny_data_file, tmp_path)
    assert key == sweep_key(config, "fp")
    assert models.local_revision(models.BUNDLED_MODEL) == ""
