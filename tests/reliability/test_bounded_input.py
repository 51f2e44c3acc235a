"""Round three (issue 31, part A): masking never corrupts a stored value; YAML aliases are refused and every echo is
bounded before it is built; settings files are regular files of bounded size and data text is cut before the
tokenizer; control and bidirectional characters never reach the terminal raw; errors name the real cause; an empty
module name is an error. Hostile inputs that could eat the machine on a regression run in a subprocess under an
address-space limit and a timeout."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time

import pytest

from entrypoints import prepare as prepare_entry
from entrypoints import report as report_entry
from entrypoints import train as train_entry
from lora_efficiency.config import TrainConfig, parse_args
from lora_efficiency.errors import ConfigError
from lora_efficiency.sweep import load_sweep
from tests.conftest import ROOT, subprocess_env
from tests.reliability.conftest import assert_one_line_error, run_entry_point, statuses

TINY = ["--max_steps", "1", "--batch_size", "2", "--seq_len", "128", "--eval_samples", "2", "--device", "cpu"]
# A Python with torch imported peaks at ~0.65 GB of address space here; 3 GB leaves room for any honest run of
# these commands and stops a runaway one (an alias bomb reached 9.35 GB) with MemoryError long before the machine.
ADDRESS_SPACE = 3 << 30
RAW = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # what must never reach a terminal raw
SETTINGS_LINE = "from lora_efficiency.cli import run_cli; from lora_efficiency.config import parse_args, TrainConfig; "


def alias_bomb(levels: int = 9, indent: str = "") -> str:
    """A YAML list of 10^levels leaves in ~50 bytes a level: each level is a list of ten aliases of the last."""
    lines = [f"{indent}- &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for n in range(1, levels + 1):
        lines.append(f"{indent}- &a{n} [" + ", ".join([f"*a{n - 1}"] * 10) + "]")
    return "\n".join(lines)


def run_bounded(code: str, timeout: float = 60) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of `python -c code` in the repository, its address space capped at 3 GB;
    a run past `timeout` is killed and reported as status -9."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))  # noqa: E731
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return -9, err, time.monotonic() - start
    return proc.returncode, err, time.monotonic() - start


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# 1. Masking corrupts no stored value ----------------------------------------------------------------------------


@pytest.mark.parametrize("variable, value", [("DB_PASSWORD", "probe"), ("MY_SERVICE_SECRET", "data")])
def test_a_secret_equal_to_a_path_component_corrupts_no_stored_path(
    variable, value, store, tiny_model_dir, tiny_data_file, tmp_path, monkeypatch, capsys
):
    """DB_PASSWORD=probe with the cache under a folder named `probe`; MY_SERVICE_SECRET=data, the name of the folder
    every prepared folder lives in (<cache>/data/...). Was: prepare stored prepared_path with *** in place of that
    component, and `train --data <prepare run id>` failed for good ("not on this machine")."""
    monkeypatch.setenv("LORA_EFFICIENCY_CACHE", str(tmp_path / "probe" / "cache"))
    data = tmp_path / "probe" / "tiny.jsonl"
    data.parent.mkdir(exist_ok=True)
    shutil.copy(tiny_data_file, data)
    monkeypatch.setenv(variable, value)
    argv = ["--dataset", data, "--model", tiny_model_dir, "--seq_len", "128"]
    code, out, err = run_entry_point(prepare_entry.main, argv, capsys)
    assert code == 0, err[-2000:]
    (prepare_run,) = store.search_runs([store.get_experiment_by_name("reliability").experiment_id])
    stored = prepare_run.data.tags["prepared_path"]
    assert "***" not in stored and os.path.isdir(stored) and f"{os.sep}{value}{os.sep}" in stored
    assert prepare_run.data.params["dataset"] == str(data)
    code, out, err = run_entry_point(
        train_entry.main, ["--model", tiny_model_dir, "--data", prepare_run.info.run_id, *TINY], capsys
    )
    assert code == 0, err[-2000:]
    # text meant for a person is still masked, however short the value
    code, _, err = run_entry_point(train_entry.main, ["--data", str(tmp_path / value / "missing.jsonl")], capsys)
    line = assert_one_line_error(code, err, "is invalid")
    assert f"/{value}/" not in line and "/***/" in line


# 2. YAML: no aliases, types checked, echoes bounded ---------------------------------------------------------------


def test_alias_bombs_are_refused_in_every_settings_file_at_once(tmp_path):
    """Nine levels of aliases (10^9 leaves) in a sweep's `seeds`, in a sweep's `base.target_modules`, and in a
    defaults file. Was: 162 s and 5.2 GB then a 1.6 GB error line; 9.35 GB then MemoryError; 6.0 GB."""
    seeds = tmp_path / "seeds.yaml"
    seeds.write_text(f"axes:\n  rank: [8]\nseeds:\n{alias_bomb(indent='  ')}\n")
    modules = tmp_path / "modules.yaml"
    modules.write_text(f"base:\n  target_modules:\n{alias_bomb(indent='    ')}\naxes:\n  rank: [8]\n")
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(f"train:\n  target_modules:\n{alias_bomb(indent='    ')}\n")
    cases = {
        seeds: f"from lora_efficiency.cli import run_cli; from entrypoints.sweep import main; run_cli(main, "
        f"['--config', {str(seeds)!r}])",
        modules: f"from lora_efficiency.cli import run_cli; from entrypoints.sweep import main; run_cli(main, "
        f"['--config', {str(modules)!r}])",
        defaults: SETTINGS_LINE + f"run_cli(lambda a: parse_args(TrainConfig, 'train', a, ''), "
        f"['--defaults', {str(defaults)!r}])",
    }
    for path, code in cases.items():
        status, err, seconds = run_bounded(code)
        line = one_error_line(err)
        assert status == 2 and seconds < 30 and len(err) < 5000, (path.name, status, seconds, err[-500:])
        assert "alias" in line or "anchor" in line, line


def test_shown_is_bounded_while_it_is_built():
    """repr() of a list of 10^9 leaves (nine levels of ten shared references, as an alias bomb builds it) was built
    whole before it was cut: here under a 3 GB address space it must come back short, at once."""
    code = (
        "from lora_efficiency.errors import shown\nx = [1]\nfor _ in range(9): x = [x] * 10\n"
        "text = shown(x)\nassert len(text) < 200, len(text)"
    )
    status, err, seconds = run_bounded(code, timeout=30)
    assert status == 0 and seconds < 20, (status, seconds, err[-500:])


@pytest.mark.parametrize(
    "name", [["a", "list"], {"a": 1}, "x\x1b]0;owned\x07\nerror: forged line", "\u202eevil", "n" * 10_000, 7]
)
def test_a_sweep_name_must_be_a_printable_string_of_bounded_length(name, tmp_path):
    """Was: a list became a 34 MB run name, and ESC, OSC and a newline in a name reached the terminal raw."""
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"name": name, "axes": {"rank": [8]}}))  # JSON is YAML
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    (problem,) = info.value.problems
    assert problem.startswith("name=") and len(problem) < 400 and not RAW.search(problem), problem


def test_seeds_and_axes_are_echoed_bounded(tmp_path):
    """`seeds={seeds!r}` and `axes={axes!r}` echoed whole: 20,000 bad seeds were a 130 KB line."""
    for spec in ({"axes": {"rank": [8]}, "seeds": ["x"] * 20_000}, {"axes": {"rank": list(range(20_000)), "b": 5}}):
        path = tmp_path / "s.yaml"
        path.write_text(json.dumps(spec))
        with pytest.raises(ConfigError) as info:
            load_sweep(path)
        assert len(str(info.value)) < 500, str(info.value)[:300]


# 3. Memory bounded by input size ------------------------------------------------------------------------------


def test_settings_files_that_are_not_regular_files(tmp_path):
    """`--defaults /dev/zero` reached 8.8 GB in 17 s; a FIFO with no writer hung for good; a folder; a 2.4 MB file;
    400,000 levels of nesting (was a RecursionError line)."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("train:\n" + "  # padding\n" * 200_000)
    deep = tmp_path / "deep.yaml"
    deep.write_text("train:\n  rank: " + "[" * 400_000)  # PyYAML composes nesting recursively
    cases = {
        str(deep): "nested too deeply",
        "/dev/zero": "a character device",
        str(fifo): "a FIFO",
        str(tmp_path): "a folder",
        str(big): "larger than 1,048,576 bytes",
    }
    for path, expected in cases.items():
        code = SETTINGS_LINE + f"run_cli(lambda a: parse_args(TrainConfig, 'train', a, ''), ['--defaults', {path!r}])"
        status, err, seconds = run_bounded(code, timeout=40)
        line = one_error_line(err)
        assert status == 2 and seconds < 30 and expected in line and "defaults=" in line, (path, line)
    code = (  # a sweep file that is a FIFO: load_sweep itself, as `sweep` and `main` call it
        "from lora_efficiency.cli import run_cli; from lora_efficiency.sweep import load_sweep; "
        f"run_cli(lambda a: load_sweep({str(fifo)!r}), [])"
    )
    status, err, seconds = run_bounded(code, timeout=40)
    line = one_error_line(err)
    assert status == 2 and seconds < 30 and "config=" in line and "a FIFO" in line, line


def test_data_text_is_cut_to_what_seq_len_can_hold_before_the_tokenizer(tokenizer_dir):
    """A 20 MB JSONL line peaked at 3.5 GB at seq_len 128 and a 200 MB one aborted the Rust tokenizer (exit 134):
    the whole text was tokenized before truncation. Now the tokenizer never sees more than a bound of characters
    derived from seq_len, and the row it yields is the same as from the whole text."""
    from transformers import AutoTokenizer

    from lora_efficiency.data import Example, format_example, tokenize, tokenize_texts

    real = AutoTokenizer.from_pretrained(tokenizer_dir)
    seen: list[int] = []

    class Recording:  # the real tokenizer, recording how long each text it is given is
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return real(text, **kwargs)

    words = "the quick brown fox jumps over the lazy dog " * 25_000  # 1.1 M characters, ~250 k tokens
    split = tokenize(Recording(), [Example("Say it:", words)], seq_len=128)
    assert max(seen) < 100_000 and split.num_truncated == 1
    _, full_text = format_example(real, Example("Say it:", words))
    assert split.input_ids[0] == real(full_text, add_special_tokens=False)["input_ids"][:128]
    seen.clear()
    texts = tokenize_texts(Recording(), [words], seq_len=128)
    assert max(seen) < 100_000 and texts.num_truncated == 1
    assert texts.input_ids[0] == real(words, add_special_tokens=False)["input_ids"][:128]


def test_running_out_of_memory_is_one_line_and_leaves_no_run_running(store, monkeypatch, tiny_model_dir, capsys):
    import lora_efficiency.prepare

    def exhausted(**kwargs):
        raise MemoryError

    monkeypatch.setattr(lora_efficiency.prepare, "prepare_data", exhausted)
    code, _, err = run_entry_point(prepare_entry.main, ["--model", tiny_model_dir], capsys)
    assert_one_line_error(code, err, "out of memory", "seq_len")
    assert statuses(store) == ["FAILED"]


# 5. Control and bidirectional characters never reach the terminal raw --------------------------------------------

HOSTILE = "a\x1b[31mred\x1b]0;title\x07\u202etxt.exe"


def test_a_data_file_name_with_escapes_is_printed_escaped(store, tiny_model_dir, tiny_data_file, tmp_path, capsys):
    """Was: "prepared <name>" and the folder line printed ESC, OSC and U+202E as they are."""
    data = tmp_path / f"{HOSTILE}.jsonl"
    shutil.copy(tiny_data_file, data)
    code, out, err = run_entry_point(prepare_entry.main, ["--dataset", data, "--model", tiny_model_dir], capsys)
    assert code == 0, err[-2000:]
    assert "prepared " in out and "\\x1b" in out
    assert not {"\x1b", "\x07", "\u202e"} & set(out + err)


def test_stored_experiment_names_are_listed_escaped_and_bounded(store, capsys):
    """`report --experiment <unknown>` lists the store's experiment names: one holding ESC, OSC and a newline forged
    a second `error:` line; a 10,000-character one was echoed whole."""
    store.create_experiment(f"{HOSTILE}\nerror: forged")
    store.create_experiment("n" * 250)
    code, out, err = run_entry_point(report_entry.main, ["--experiment", "x" * 10_000], capsys)
    line = assert_one_line_error(code, err, "does not exist", "known experiments are")
    assert len(line) < 1000 and not {"\x1b", "\x07", "\u202e"} & set(err)


def test_every_error_line_is_escaped():
    from lora_efficiency.cli import terminal_line

    assert terminal_line(f"x={HOSTILE}\nerror: forged") == (
        "x=a\\x1b[31mred\\x1b]0;title\\x07\\u202etxt.exe\\nerror: forged"
    )
    assert len(terminal_line("y" * 100_000)) < 2100


# 9. Errors name the real cause ---------------------------------------------------------------------------------


def test_a_read_only_store_says_so(store, tiny_model_dir, monkeypatch, capsys):
    """SQLAlchemy's message for a write to a read-only SQLite file, when an autoflush did it, opens with the
    autoflush: the error line said "Query-invoked autoflush" and the cause was only in the log."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    message = (
        "(raised as a result of Query-invoked autoflush; consider using a session.no_autoflush block if this flush "
        "is occurring prematurely)\n(sqlite3.OperationalError) attempt to write a readonly database\n"
        "[SQL: INSERT INTO runs (run_uuid) VALUES (?)]\n(Background on this error at: https://sqlalche.me/e/20/e3q8)"
    )

    def read_only(self, *args, **kwargs):
        raise MlflowException(message)

    monkeypatch.setattr(SqlAlchemyStore, "create_run", read_only)
    code, _, err = run_entry_point(train_entry.main, ["--model", tiny_model_dir, *TINY], capsys)
    line = assert_one_line_error(code, err, "readonly database")
    assert "autoflush" not in line


@pytest.mark.parametrize("kind", ["character device", "FIFO"])
def test_devices_and_fifos_given_as_data_are_named(kind, store, tiny_model_dir, tmp_path, capsys):
    """Was: "is a folder, not a file" for /dev/null and a FIFO."""
    path = "/dev/null" if kind == "character device" else str(tmp_path / "pipe.jsonl")
    if kind == "FIFO":
        os.mkfifo(path)
    code, _, err = run_entry_point(train_entry.main, ["--model", tiny_model_dir, "--data", path, *TINY], capsys)
    assert_one_line_error(code, err, f"is a {kind}", "not a file")
    code, _, err = run_entry_point(prepare_entry.main, ["--model", tiny_model_dir, "--dataset", path], capsys)
    assert_one_line_error(code, err, f"is a {kind}", "not a file")


def test_a_sweep_file_that_is_not_a_file_and_a_base_that_is_not_a_mapping(tmp_path):
    """Was: "is invalid: an existing sweep file" for a FIFO or a folder, and a TypeError line for `base: [1, 2]`."""
    from lora_efficiency.config import SweepConfig

    fifo = tmp_path / "sweep.yaml"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (tmp_path, "a folder")):
        with pytest.raises(ConfigError, match=f"config='{path}' is {kind}.*, not a file"):
            parse_args(SweepConfig, "sweep", ["--config", str(path)], "")
    listed = tmp_path / "listed.yaml"
    listed.write_text(json.dumps({"base": [1, 2], "axes": {"rank": [8]}}))
    with pytest.raises(ConfigError, match=r"base=\[1, 2\] is invalid: a mapping"):
        load_sweep(listed)


# 11. An empty module name -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["q_proj,,v_proj", "q_proj,v_proj,", ",q_proj", "q_proj, ,v_proj"])
def test_an_empty_item_in_a_module_list_is_an_error(spec):
    with pytest.raises(ConfigError) as info:
        parse_args(TrainConfig, "train", ["--target_modules", spec], "")
    (problem,) = info.value.problems
    assert problem.startswith(f"target_modules={spec!r} is invalid") and "none empty" in problem


def test_generated_text_keeps_its_lines_and_nothing_that_drives_the_terminal():
    from lora_efficiency.errors import printable_lines

    answer = "line one\n\x1b]0;owned\x07line two \u202egnirts\r\nerror: forged"
    shown = printable_lines(answer)
    assert shown.split("\n") == ["line one", "\\x1b]0;owned\\x07line two \\u202egnirts\\r", "error: forged"]
    assert not any(ord(c) < 32 and c != "\n" for c in shown)
