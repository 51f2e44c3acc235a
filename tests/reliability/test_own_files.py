"""What a command keeps of its own on disk never reaches anything else: the report never writes through a link in its
output folder (its `.report-files` list, its report, csv and charts), and `prepare`'s temporary folders left by a
process killed with -9 are removed by the next prepare, never those of a process that lives."""

from __future__ import annotations

import os

import pytest

from entrypoints import report as report_entry
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
