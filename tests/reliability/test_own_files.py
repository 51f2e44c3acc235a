"""What a command keeps of its own on disk never reaches anything else: the report never writes through a link in its
output folder (its `.report-files` list, its report, csv and charts), and `prepare`'s temporary folders left by a
process killed with -9 are removed by the next prepare, never those of a process that lives."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psutil
import pytest

from entrypoints import prepare as prepare_entry
from entrypoints import report as report_entry
from tests.conftest import ROOT, subprocess_env
from tests.reliability.conftest import assert_one_line_error, run_entry_point
from tests.report_store import build_study


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_a_report_files_list_that_is_a_link_is_refused_and_its_target_kept(link, store, tmp_path, capsys):
    """Was: a `.report-files` linked to a file elsewhere got that file overwritten with the report's list (exit 0)."""
    build_study(store, "reliability")
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    if link == "symlink":
        (out / ".report-files").symlink_to(victim)
    else:
        os.link(victim, out / ".report-files")
    code, _, err = run_entry_point(report_entry.main, ["--experiment", "reliability", "--output", out], capsys)
    assert_one_line_error(code, err, f"output='{out}'", ".report-files", "choose a new or empty folder")
    assert victim.read_text() == "precious" and not (out / "report.md").exists()


# A `prepare` held while it writes its temporary folder (save_to_disk of the train split never returns), as a
# process of its own: the moment a `kill -9` leaves a half-written `.prepare-*` folder in the cache.
HELD_PREPARE = """
import pathlib, sys, time
import datasets
def held(self, path, *args, **kwargs):
    pathlib.Path(path).mkdir(parents=True)
    print("writing", flush=True)
    time.sleep(600)
datasets.Dataset.save_to_disk = held
from entrypoints import prepare
from lora_efficiency.cli import run_cli
run_cli(prepare.main, sys.argv[1:])
"""


def test_the_next_prepare_removes_a_killed_prepares_temporary_folder_not_a_live_ones(
    store, tiny_model_dir, tiny_data_file, tmp_path, monkeypatch, capsys
):
    """Was: every `kill -9` during prepare left its `.prepare-*` folder in the cache for good (never served, never
    removed). The folder's name now carries its owner (pid, start time, host): the next prepare removes those whose
    process is gone."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_EFFICIENCY_CACHE", str(cache))
    argv = ["--dataset", str(tiny_data_file), "--model", str(tiny_model_dir), "--seq_len", "128"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    held = subprocess.Popen([sys.executable, "-c", HELD_PREPARE, *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert held.stdout.readline() == b"writing\n"
    finally:
        held.kill()
        held.wait()
    (killed,) = (cache / "data").glob(".prepare-*")
    live = cache / "data" / f".prepare-{os.getpid()}-{psutil.Process().create_time():.0f}-{socket.gethostname()}-x"
    live.mkdir()  # as cli.temp_sibling names it for this process, which lives
    code, _, err = run_entry_point(prepare_entry.main, argv, capsys)
    assert code == 0, err[-2000:]
    assert not killed.exists() and live.is_dir()
    assert len([p for p in (cache / "data").iterdir() if (p / "manifest.json").exists()]) == 1
