"""`python -m entrypoints.bench` parses through the typed-config path: the `bench` defaults of
configs/default.yaml, one error line and exit status 2 for bad input, before anything is measured."""

from __future__ import annotations

import pytest

from entrypoints import bench as bench_entry
from lora_efficiency.bench import MODES, RANDOM_SHAPES
from lora_efficiency.cli import run_cli
from lora_efficiency.config import RANDOM_SHAPE_NAMES, BenchConfig, parse_args


@pytest.fixture(autouse=True)
def nothing_measured(monkeypatch):
    def fail(**kwargs):
        raise AssertionError("a bad flag must stop the benchmark before it runs")

    monkeypatch.setattr("lora_efficiency.bench.run_benchmark", fail)


def test_defaults_are_make_bench():
    cfg = parse_args(BenchConfig, "bench", [], "")
    assert cfg.mode_list == ["bf16", "nf4", "int8"]
    assert (cfg.steps, cfg.warmup_steps, cfg.repeats, cfg.batch_size, cfg.seq_len) == (8, 2, 3, 4, 512)
    assert (cfg.ref_batch_size, cfg.profile_steps, cfg.startup_launches) == (0, 2, 3)
    assert (cfg.model, cfg.data, cfg.device) == ("smollm2-135m", "", "auto")
    assert (cfg.output, cfg.json) == ("docs/benchmarks.md", "docs/bench-results.json")


def test_random_shape_names_are_the_benchmarks():
    assert set(RANDOM_SHAPE_NAMES) == set(RANDOM_SHAPES)
    assert parse_args(BenchConfig, "bench", ["--model", RANDOM_SHAPE_NAMES[0]], "").model == RANDOM_SHAPE_NAMES[0]
    assert "fp16" not in MODES


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "bf16,fp16"], "modes='bf16,fp16' is invalid: a comma list of bf16, nf4, fp4, int8, fp32"),
        (["--modes", ","], "modes=',' is invalid: a comma list of"),
        (["--repeats", "0"], "repeats=0 is invalid: an integer >= 1"),
        (["--repeats", "abc"], "repeats='abc' is invalid: an integer"),
        (["--profile_steps", "-1"], "profile_steps=-1 is invalid: an integer >= 0"),
        (["--steps", "2"], "steps=2 is invalid: more than warmup_steps=2"),
        (["--seq_len", "8"], "seq_len=8 is invalid: an integer from 16 to 131072"),
        (["--device", "gpu"], "device='gpu' is invalid: auto, cpu, cuda or cuda:N"),
        (["--model", "no-such-model"], "or one of the random-weight shapes llama-3.2-1b-shape"),
        (["--bogus", "1"], "unknown argument '--bogus 1'"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(bench_entry.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_every_problem_is_named_at_once(capsys):
    with pytest.raises(SystemExit):
        run_cli(bench_entry.main, ["--repeats", "0", "--seq_len", "8", "--device", "gpu"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(f in err for f in ("repeats=0", "seq_len=8", "device='gpu'"))
