"""The one definition of a configuration: every train setting is placed, and the identities derive from it."""

from __future__ import annotations

import dataclasses

import pytest

from lora_efficiency import configuration as C
from lora_efficiency.config import TrainConfig, build_config, read_defaults
from lora_efficiency.errors import ConfigError


def _config(**overrides) -> TrainConfig:
    return build_config(TrainConfig, {**read_defaults("train"), **overrides})


def test_every_train_setting_is_in_exactly_one_group():
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(C.TRAIN_SETTINGS) == sorted(fields)
    assert len(set(C.TRAIN_SETTINGS)) == len(C.TRAIN_SETTINGS)
    assert set(C.PLANNER_SETTINGS) <= set(C.ADAPTER_SETTINGS)


def test_config_hash_groups_seeds_and_names_but_not_adapter_or_eval_settings():
    resolved = {**dataclasses.asdict(_config()), "base_model": "m", "data_fingerprint": "f"}
    same = {**resolved, "seed": 7, "model": "/elsewhere/m", "data": "a-run-id", "device": "cuda", "resume_from": "x"}
    assert C.config_hash(resolved) == C.config_hash(same)
    for key, value in (("rank", 4), ("lr", 1e-3), ("eval_samples", 3), ("data_fingerprint", "g"), ("world_size", 2)):
        assert C.config_hash(resolved) != C.config_hash({**resolved, key: value}), key


def test_sweep_key_tells_seeds_apart_and_takes_a_config_or_its_dict():
    one = _config()
    assert C.sweep_key(one, "fp") == C.sweep_key(dataclasses.asdict(one), "fp")
    assert C.sweep_key(one, "fp") != C.sweep_key(_config(seed=1), "fp")
    assert C.sweep_key(one, "fp") != C.sweep_key(one, "other")
    assert C.sweep_key(one, "fp") == C.sweep_key(_config(device="cpu", checkpoint_every=5), "fp")


def test_planner_inputs_are_taken_from_a_configuration():
    inputs = C.planner_inputs(dataclasses.asdict(_config(rank=8, quantization="bf16")))
    assert inputs["rank"] == 8 and inputs["quantization"] == "bf16"
    assert set(inputs) == set(C.PLANNER_SETTINGS)


def test_sharding_enters_identities_only_when_set_and_the_report_tells_it_apart():
    resolved = {**dataclasses.asdict(_config()), "base_model": "m", "data_fingerprint": "f"}
    before = {k: v for k, v in resolved.items() if k != "sharding"}  # a run stored before the setting existed
    assert C.config_hash(resolved) == C.config_hash(before)
    sharded = {**resolved, "sharding": "fsdp", "world_size": 2}
    assert C.config_hash(sharded) != C.config_hash({**resolved, "world_size": 2})
    unsharded = {k: v for k, v in dataclasses.asdict(_config()).items() if k != "sharding"}
    assert C.sweep_key(_config(), "fp") == C.sweep_key(unsharded, "fp")
    assert C.sweep_key(_config(sharding="fsdp", num_processes=2), "fp") != C.sweep_key(_config(num_processes=2), "fp")
    assert {"world_size", "sharding"} <= set(C.REPORT_SETTINGS)


def test_settings_are_small_documented_groups_and_train_config_declares_none_of_its_own():
    from lora_efficiency import settings as S

    for key, group in S.GROUPS.items():
        fields = dataclasses.fields(group)
        assert 1 <= len(fields) <= 16, key
        assert all(f.metadata.get("help") for f in fields), key  # every field says what it means
        assert group.__dataclass_params__.frozen, key
    assert [f.name for f in dataclasses.fields(TrainConfig)] == [n for g in S.GROUPS.values() for n in S.names(g)]
    assert "__annotations__" not in vars(TrainConfig) or not vars(TrainConfig)["__annotations__"]


def test_a_settings_file_holds_the_groups_and_reads_back_flat_or_grouped(tmp_path):
    from lora_efficiency.config import parse_args, read_mapping, settings_text

    cfg = _config(rank=8, lr=1e-3)
    path = tmp_path / "settings.yaml"
    path.write_text(settings_text(cfg), encoding="utf-8")
    train = read_mapping(path, "config")["train"]
    assert list(train) == ["model_data", "adapter", "optimization", "evaluation", "validation", "compute"]
    assert train["adapter"]["rank"] == 8 and train["optimization"]["lr"] == 1e-3
    assert parse_args(TrainConfig, "train", ["--config", str(path)], "") == cfg
    path.write_text("train:\n  rank: 8\n  adapter:\n    rank: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="rank is given twice in the settings file"):
        parse_args(TrainConfig, "train", ["--config", str(path)], "")
