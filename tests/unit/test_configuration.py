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
    fields = list(TrainConfig.from_flat(read_defaults("train")).flat())
    assert sorted(C.TRAIN_SETTINGS) == sorted(fields)
    assert len(set(C.TRAIN_SETTINGS)) == len(C.TRAIN_SETTINGS)
    assert set(C.PLANNER_SETTINGS) <= set(C.ADAPTER_SETTINGS)


def test_config_hash_groups_seeds_and_names_but_not_adapter_or_eval_settings():
    resolved = {**_config().flat(), "base_model": "m", "data_fingerprint": "f"}
    same = {**resolved, "seed": 7, "model": "/elsewhere/m", "data": "a-run-id", "device": "cuda", "resume_from": "x"}
    assert C.config_hash(resolved) == C.config_hash(same)
    for key, value in (("rank", 4), ("lr", 1e-3), ("eval_samples", 3), ("data_fingerprint", "g"), ("world_size", 2)):
        assert C.config_hash(resolved) != C.config_hash({**resolved, key: value}), key


def test_sweep_key_tells_seeds_apart_and_takes_a_config_or_its_dict():
    one = _config()
    assert C.sweep_key(one, "fp") == C.sweep_key(one.flat(), "fp")
    assert C.sweep_key(one, "fp") != C.sweep_key(_config(seed=1), "fp")
    assert C.sweep_key(one, "fp") != C.sweep_key(one, "other")
    assert C.sweep_key(one, "fp") == C.sweep_key(_config(device="cpu", checkpoint_every=5), "fp")


def test_planner_inputs_are_taken_from_a_configuration():
    inputs = C.planner_inputs(_config(rank=8, quantization="bf16").flat())
    assert inputs["rank"] == 8 and inputs["quantization"] == "bf16"
    assert set(inputs) == set(C.PLANNER_SETTINGS)


def test_sharding_enters_identities_only_when_set_and_the_report_tells_it_apart():
    resolved = {**_config().flat(), "base_model": "m", "data_fingerprint": "f"}
    before = {k: v for k, v in resolved.items() if k != "sharding"}  # a run stored before the setting existed
    assert C.config_hash(resolved) == C.config_hash(before)
    sharded = {**resolved, "sharding": "fsdp", "world_size": 2}
    assert C.config_hash(sharded) != C.config_hash({**resolved, "world_size": 2})
    unsharded = {k: v for k, v in _config().flat().items() if k != "sharding"}
    assert C.sweep_key(_config(), "fp") == C.sweep_key(unsharded, "fp")
    assert C.sweep_key(_config(sharding="fsdp", num_processes=2), "fp") != C.sweep_key(_config(num_processes=2), "fp")
    assert {"world_size", "sharding"} <= set(C.REPORT_SETTINGS)


def test_settings_are_small_documented_groups_and_train_config_holds_one_of_each():
    from lora_efficiency import config as K
    from lora_efficiency import settings as S

    for key, group in S.GROUPS.items():
        fields = dataclasses.fields(group)
        assert all(f.metadata.get("help") for f in fields), key  # every field says what it means
        assert group.__dataclass_params__.frozen, key
    assert [(f.name, f.type) for f in dataclasses.fields(TrainConfig)] == [(k, g.__name__) for k, g in S.GROUPS.items()]
    # no settings dataclass over 16 fields: a longer one is groups in disguise
    classes = [v for m in (K, S) for v in vars(m).values() if isinstance(v, type) and dataclasses.is_dataclass(v)]
    assert (
        len(classes) >= 17
        and {c.__name__: len(dataclasses.fields(c)) for c in classes if len(dataclasses.fields(c)) > 16} == {}
    )


def test_each_group_checks_its_own_settings_and_the_messages_name_them():
    from lora_efficiency import settings as S

    for key, group in S.GROUPS.items():
        assert {name for name, _, _ in group.checks()} <= set(S.names(group)), key
    with pytest.raises(ConfigError) as err:
        _config(rank=0, lr=2.0, eval_every=-1, seed=-1, forget_samples=300)
    assert err.value.problems == [
        "rank=0 is invalid: an integer >= 1",
        "lr=2.0 is invalid: a number in (0, 1)",
        "forget_samples=300 is invalid: an integer from 0 (no forgetting measured) to 256 passages",
        "eval_every=-1 is invalid: an integer >= 0 (0: no validation curve)",
        f"seed=-1 is invalid: an integer from 0 to {2**32 - 1}",
    ]


def test_a_train_config_reads_changes_and_writes_flat_and_pickles():
    import pickle

    cfg = _config(rank=8, lr=1e-3)
    assert (cfg.rank, cfg.adapter.rank, cfg.lr, cfg.optimization.lr) == (8, 8, 1e-3, 1e-3)
    flat = cfg.flat()
    assert list(flat)[:3] == ["model", "data", "method"] and list(flat)[-1] == "sharding"  # field order, by group
    assert TrainConfig.from_flat(flat) == cfg
    changed = cfg.replace(rank=4, seed=9)
    assert (changed.rank, changed.seed, changed.lr, cfg.rank) == (4, 9, 1e-3, 8)  # a copy; the original unchanged
    assert changed.validation is cfg.validation  # groups not changed are shared
    with pytest.raises(TypeError, match="no setting rnak"):
        cfg.replace(rnak=4)
    with pytest.raises(AttributeError):
        _ = cfg.rnak
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # a Ray task or a forked child may receive one
    assert hash(cfg) == hash(TrainConfig.from_flat(flat))


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
