"""Artifacts are only what the run wrote: the report writes into a new or empty folder (or over an earlier report's
own files), never logs or overwrites anything else, and its default folder stays under reports/ whatever the
experiment is called. Temporary copies made for logging are removed."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from entrypoints import report as report_entry
from lora_efficiency.config import ReportConfig, parse_args, report_folder
from tests.reliability.conftest import assert_one_line_error, run_entry_point
from tests.report_store import build_study


def logged_files(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path or None):
        found |= logged_files(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def report_runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("report") == "true"]


def test_a_folder_holding_other_files_is_refused_and_nothing_is_logged(store, tmp_path, capsys):
    """Was: every file already in --output (a private key included) uploaded as an artifact of the report run."""
    build_study(store, "reliability")
    out = tmp_path / "out"
    (out / "keys").mkdir(parents=True)
    (out / "keys" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (out / "notes.txt").write_text("mine")
    code, _, err = run_entry_point(report_entry.main, ["--experiment", "reliability", "--output", out], capsys)
    assert_one_line_error(code, err, f"output='{out}' holds 2 file(s) no report wrote", "keys/id_ed25519")
    assert report_runs(store, "reliability") == [] and (out / "notes.txt").read_text() == "mine"


def test_the_report_logs_exactly_what_it_wrote_and_may_replace_its_own(store, tmp_path, capsys):
    build_study(store, "reliability")
    out = tmp_path / "out"
    code, _, err = run_entry_point(report_entry.main, ["--experiment", "reliability", "--output", out], capsys)
    assert code == 0, err[-2000:]
    (run,) = report_runs(store, "reliability")
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {".report-files"}
    assert logged_files(store, run.info.run_id) == written and {"report.md", "report.html"} <= written
    (out / "charts" / "0_stale.png").write_bytes(b"not from a report")  # an outsider among the report's own files
    code, _, err = run_entry_point(report_entry.main, ["--experiment", "reliability", "--output", out], capsys)
    assert_one_line_error(code, err, "holds 1 file(s) no report wrote (charts/0_stale.png)")
    (out / "charts" / "0_stale.png").unlink()
    code, _, err = run_entry_point(report_entry.main, ["--experiment", "reliability", "--output", out], capsys)
    assert code == 0, err[-2000:]  # a second report over the first one's files
    assert len(report_runs(store, "reliability")) == 2


@pytest.mark.parametrize("experiment", ["../../x", "..", "a/../../b", "/etc/passwd", "x\x00y", ".hidden"])
def test_the_default_folder_stays_under_reports(experiment):
    folder = report_folder(experiment)
    assert folder.parent == Path("reports") and folder.name not in ("", ".", "..") and "/" not in folder.name
    assert (Path.cwd() / folder).resolve().is_relative_to((Path.cwd() / "reports").resolve())


def test_an_experiment_named_to_escape_writes_under_reports(store, tmp_path, capsys):
    build_study(store, "../../escape")
    code, _, err = run_entry_point(report_entry.main, ["--experiment", "../../escape"], capsys)
    assert code == 0, err[-2000:]
    made = [p for p in tmp_path.rglob("report.md") if "mlruns" not in p.parts]  # not the logged copy
    assert made == [Path.cwd() / "reports" / "_.._escape" / "report.md"]


def test_output_that_is_a_file_is_refused_when_parsed(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(Exception, match="output="):
        parse_args(ReportConfig, "report", ["--output", str(tmp_path / "f")], "")


def test_redacted_copies_are_removed_after_logging(store, tmp_path, monkeypatch):
    """A folder with a secret is logged from a masked copy in a temporary folder: gone once logged, also when the
    upload fails."""
    import mlflow

    from lora_efficiency.tracking import MlflowTracker

    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue_1234567890")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "x.json").write_text('{"t": "hf_secretvalue_1234567890"}')
    mlflow.set_experiment("reliability")
    with mlflow.start_run() as run:
        tracker = MlflowTracker(run.info.run_id)
        tracker.log_artifacts(str(folder), "a")
        tracker.log_files(folder, [folder / "x.json"], "b")
        monkeypatch.setattr(mlflow, "log_artifacts", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
        with pytest.raises(Exception, match="full"):
            tracker.log_artifacts(str(folder), "c")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert logged_files(store, run.info.run_id) == {"a/x.json", "b/x.json"}
    assert (
        "hf_secret"
        not in Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="b/x.json")).read_text()
    )
