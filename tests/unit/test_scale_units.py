"""The pieces of distributed training and Ray sweeps that are pure functions: batch split, checks, keys."""

from __future__ import annotations

import pytest
import torch

from lora_efficiency import data as D
from lora_efficiency.config import SweepConfig, TrainConfig, build_config, read_defaults
from lora_efficiency.errors import ConfigError
from lora_efficiency.ray_backend import _gpus
from lora_efficiency.sweep import absolute_tracking_uri, sweep_key
from lora_efficiency.trainer import _batches


def _rows(n: int) -> D.Rows:
    """n rows of different lengths, each with a few target labels."""
    ids = [[i + 1] * (5 + i % 7) for i in range(n)]
    labels = [[D.IGNORE_INDEX] * 2 + row[2:] for row in ids]
    return D.Rows(ids, labels, [list(range(len(r))) for r in ids])


@pytest.mark.parametrize("length", [None, 16])
def test_ranks_split_the_batch_one_process_of_the_whole_size_would_take(length):
    rows = _rows(23)
    whole = _batches(rows, batch_size=4, pad_id=0, seed=3, length=length)
    ranks = [_batches(rows, batch_size=2, pad_id=0, seed=3, length=length, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(12):  # past an epoch boundary (5 batches of 4 from 23 rows)
        batch, tokens, targets = next(whole)
        parts = [next(r) for r in ranks]
        for key in batch:
            assert torch.equal(torch.cat([p[0][key] for p in parts]), batch[key])
        assert [(p[1], p[2]) for p in parts] == [(tokens, targets)] * 2  # counts are of the whole micro-batch
        assert targets == int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())


def _train_values(**over):
    return {**read_defaults("train"), **over}


@pytest.mark.parametrize(
    "over, message",
    [
        ({"num_processes": 0}, "num_processes=0 is invalid: an integer from 1 to 256"),
        ({"num_processes": 2, "checkpoint_every": 5}, "checkpoints are single-process only"),
        ({"num_processes": 2, "device": "cuda:1"}, "device='cuda:1' is invalid with num_processes=2"),
        ({"sharding": "zero3"}, "sharding='zero3' is invalid: one of none, fsdp"),
        ({"sharding": "fsdp"}, "sharding='fsdp' is invalid with num_processes=1: 2 to 256 processes"),
        ({"sharding": "fsdp", "num_processes": 2, "resume_from": "/x"}, "checkpoints are single-process only"),
        ({"sharding": "fsdp", "num_processes": 2, "method": "full"}, "sharding='fsdp' is invalid with method='full'"),
        ({"sharding": "fsdp", "num_processes": 2, "quantization": "int8"}, "with quantization='int8': nf4, fp4, bf16"),
        ({"sharding": "fsdp", "num_processes": 2, "eval_every": 2}, "sharding='fsdp' is invalid with eval_every=2: 0"),
    ],
)
def test_train_num_processes_checks(over, message):
    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, _train_values(**over))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"backend": "dask"}, "backend='dask' is invalid: local (one child after another here) or ray"),
        ({"ray_address": "auto"}, "ray_address='auto' is invalid with backend='local'"),
        ({"backend": "ray", "max_concurrent": -1}, "max_concurrent=-1 is invalid"),
        ({"backend": "ray", "cpus_per_trial": 0}, "cpus_per_trial=0.0 is invalid"),
        ({"backend": "ray", "gpus_per_trial": "one"}, "gpus_per_trial='one' is invalid: auto"),
    ],
)
def test_sweep_backend_checks(over, message):
    with pytest.raises(ConfigError) as err:
        build_config(SweepConfig, {**read_defaults("sweep"), **over})
    assert message in str(err.value)


def test_sweep_key_of_one_process_is_unchanged_by_the_num_processes_setting():
    one = build_config(TrainConfig, _train_values())
    two = one.replace(num_processes=2)
    assert sweep_key(one, "fp") != sweep_key(two, "fp")
    # the key a single-process child had before num_processes existed: the same settings without it (and without
    # the settings added since: method at its default lora, sharding at its default none, forget_samples at its
    # default 16, the monitoring ones, attention and compile, which never enter a key)
    import hashlib
    import json

    settings = {
        k: v
        for k, v in one.flat().items()
        if k not in ("device", "data", "checkpoint_every", "resume_from", "num_processes")
        and k not in ("method", "sharding", "forget_samples", "eval_every", "val_samples", "converge_tol", "attention")
        and k != "compile"
    }
    payload = json.dumps({**settings, "data_fingerprint": "fp"}, sort_keys=True)
    assert sweep_key(one, "fp") == hashlib.sha256(payload.encode()).hexdigest()[:16]


def test_gpus_per_trial_auto_follows_the_cluster_and_the_processes():
    assert _gpus("auto", 1, cluster_gpus=0) == 0
    assert _gpus("auto", 2, cluster_gpus=8) == 2
    assert _gpus("0.5", 1, cluster_gpus=8) == 0.5


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_tracking_uri("http://host:5000") == "http://host:5000"


def test_fsdp_launch_is_refused_with_one_line(monkeypatch):
    from lora_efficiency.distributed import setup
    from lora_efficiency.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError) as err:
        setup(torch.device("cpu"))
    assert "accelerate launch with FSDP: not supported" in str(err.value) and "--sharding fsdp" in str(err.value)
    assert "\n" not in str(err.value)


def test_without_a_launcher_this_process_is_the_whole_group(monkeypatch):
    from lora_efficiency import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    group = distributed.setup(torch.device("cpu"))
    assert (group.rank, group.size, group.is_main, distributed.world_size()) == (0, 1, True, 1)
    assert group.sum(2.5) == 2.5 and group.gather("x") == ["x"]


def test_a_sigterm_whose_interrupt_was_swallowed_is_raised_again(monkeypatch):
    import signal

    from lora_efficiency import cli as errors

    monkeypatch.setattr(errors, "_TERMINATED", [])
    errors.raise_if_terminated()  # nothing asked to stop: nothing happens
    with pytest.raises(KeyboardInterrupt):
        errors._interrupt(signal.SIGTERM, None)  # e.g. inside a finalizer, where Python drops it...
    with pytest.raises(KeyboardInterrupt):
        errors.raise_if_terminated()  # ...so the training loop raises it at the next step


def test_a_sigterm_inside_mlflow_logging_is_held_until_the_next_step(monkeypatch):
    import signal

    from lora_efficiency import cli as errors

    monkeypatch.setattr(errors, "_TERMINATED", [])
    with errors.no_interrupts():
        errors._interrupt(signal.SIGTERM, None)  # held: nothing raised inside the block
    with pytest.raises(KeyboardInterrupt):
        errors.raise_if_terminated()


def test_the_report_keeps_runs_apart_that_differ_only_in_world_size_or_sharding():
    """Three runs of one configuration but for how they ran: one process (logged before sharding existed), DDP over
    2, FSDP over 2. config_hash (the tag) and the report's settings both tell them apart."""
    from lora_efficiency.configuration import config_hash
    from lora_efficiency.report.findings import group_configurations
    from lora_efficiency.report.runs import RunData
    from tests.report_store import train_params

    base = {k: str(v) for k, v in train_params(16, "nf4", 0).items()} | {"base_model": "m", "data_fingerprint": "f"}
    how = {"one": {}, "ddp": {"world_size": "2", "sharding": "none"}, "fsdp": {"world_size": "2", "sharding": "fsdp"}}
    runs = []
    for name, extra in how.items():
        params = base | extra
        tags = {"config_hash": config_hash(params)}
        runs.append(RunData(name.ljust(32, "0"), name, "FINISHED", 0, params, {"eval/perplexity": 5.0}, tags))
    configs = group_configurations(runs)
    assert len(configs) == 3
    assert sorted(c.label for c in configs) == [
        "r16 attention nf4 world_size=1 sharding=none",
        "r16 attention nf4 world_size=2 sharding=fsdp",
        "r16 attention nf4 world_size=2 sharding=none",
    ]
