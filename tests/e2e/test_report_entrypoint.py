"""The report entry point against a tracking server holding known values (tests/report_store.py)."""

from __future__ import annotations

import csv
import subprocess
import sys
import uuid

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, mlflow_run, runs_of, subprocess_env
from tests.report_store import add_child, build_study

pytestmark = pytest.mark.e2e


def report(tracking_uri: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "entrypoints.report", *args]
    env = subprocess_env(MLFLOW_TRACKING_URI=tracking_uri)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_report_tables_intervals_front_and_noise_match_the_known_values(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    experiment = f"report-{uuid.uuid4().hex[:8]}"
    build_study(client, experiment)
    out = tmp_path / "report"
    proc = report(mlflow_server, "--experiment", experiment, "--output", str(out), "--budgets_mb", "1012,2000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "report.md").read_text()

    # every configuration: mean [95% interval] (t = 4.303 for 3 seeds), the failed run and the baseline
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| ") and " | " in line}
    assert "| 4.100 [3.852, 4.348] |" in rows["r4 attention nf4"]
    assert "| 3.600 [3.352, 3.848] |" in rows["r8 attention nf4"]
    assert "| 3.570 [3.520, 3.620] | not measured |" in rows["r16 attention bf16"]  # no exact match for bf16
    assert "| 1,000 [975, 1,025] |" in rows["r4 attention nf4"]  # peak memory: 990, 1000, 1010 MB
    assert "| 6.000 | 0.0 |" in rows["baseline: no adapter, nf4"]
    assert "killed by signal 9" in md.split("## Failed runs")[1]
    # the Pareto front of perplexity against memory: r4 -> r8 -> bf16; r16 (more memory than r8, not better) off it
    front = next(line for line in md.splitlines() if line.startswith("- Pareto front of perplexity"))
    assert [part.split(" (")[0] for part in front.split(": ", 1)[1].split(" -> ")] == [
        "#4 r4 attention nf4",
        "#2 r8 attention nf4",
        "#1 r16 attention bf16",
    ]
    assert rows["r16 attention nf4"].endswith("|  |")  # not on any front
    # paired by seed, perplexity as a ratio with exp of the difference's interval, Holm-adjusted p, the verdict:
    # r8 is 0.02 below r16 at every seed (equivalent within the margin), r4 is 13 % worse
    lines = {line.split(":")[0]: line for line in md.splitlines() if line.startswith("- r")}
    assert lines["- r8 vs r16"].startswith(
        "- r8 vs r16: perplexity ratio 0.994, 95% [0.994, 0.995], 90% [0.994, 0.995] (3 pairs by seed; Holm p"
    )
    assert "): equivalent within ±2% (better beyond noise, by less than the margin);" in lines["- r8 vs r16"]
    assert lines["- r4 vs r16"].startswith(
        "- r4 vs r16: perplexity ratio 1.133, 95% [1.124, 1.142], 90% [1.126, 1.139] (3 pairs by seed; Holm p"
    )
    assert "): worse;" in lines["- r4 vs r16"]
    assert "| r8 | r16 | 3 | 0.994, 95% [0.994, 0.995], 90% [0.994, 0.995] |" in md  # the comparison's table of tests
    assert "paired by seed" in md and "margin 1.02" in md and "Holm-Bonferroni at alpha = 0.05" in md
    assert "unpaired: the base is one evaluation" in md  # the baseline cannot be paired, and the report says so
    assert "exact match not measured" in md.split("- nf4 vs bf16:")[1].splitlines()[0]
    assert "- 1,012 MB: r4 attention nf4" in md and "- 2,000 MB: r16 attention bf16" in md
    assert "no estimate" in md and "/nonexistent/model" in md  # the memory chart skips that run, with a note
    # these runs predate metrics per task family: the section says it cannot show them rather than a blank table
    assert "cannot be shown" in md.split("## Task families")[1].split("##")[0]

    with (out / "configurations.csv").open() as f:
        table = {row["configuration"]: row for row in csv.DictReader(f)}
    assert float(table["r4 attention nf4"]["eval/perplexity:low"]) == pytest.approx(3.851587, abs=1e-5)
    assert float(table["r8 attention nf4"]["eval/perplexity:std"]) == pytest.approx(0.1)

    html = (out / "report.html").read_text()
    charts = sorted(p.name for p in (out / "charts").glob("*.png"))
    assert charts == [
        "1_rank.png",
        "2_frontier.png",
        "4_quantization.png",
        "5_loss_curves.png",
        "6_speed_memory.png",
        "7_memory_estimate.png",
    ]
    assert html.count("data:image/png;base64,") == len(charts) and 'src="charts/' not in html

    (run,) = [r for r in runs_of(client, experiment) if r.data.tags.get("report") == "true"]
    assert run.info.status == "FINISHED" and run.data.tags["report_configurations"] == "4"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "configurations.csv", "charts"} <= logged


@pytest.mark.parametrize("case", ["no runs", "only failed runs", "no such experiment"])
def test_nothing_to_report_is_one_line_and_a_non_zero_exit(mlflow_server, case):
    client = MlflowClient(mlflow_server)
    experiment = f"report-{uuid.uuid4().hex[:8]}"
    if case != "no such experiment":
        experiment_id = client.create_experiment(experiment)
    if case == "only failed runs":
        parent = client.create_run(experiment_id, run_name="sweep", tags={"entry_point": "sweep"}).info.run_id
        add_child(client, experiment_id, parent, "fp4", 0, status="FAILED")
    proc = report(mlflow_server, "--experiment", experiment)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    expected = {
        "no runs": f"error: experiment '{experiment}' has no FINISHED training runs to report",
        "only failed runs": f"error: experiment '{experiment}': all 1 training runs FAILED, nothing to report",
        "no such experiment": f"error: experiment='{experiment}' does not exist",
    }[case]
    assert proc.stderr.strip().startswith(expected) and "\n" not in proc.stderr.strip()


def test_mlflow_run_reports_the_experiment_it_runs_in_and_fails_cleanly(mlflow_server):
    client = MlflowClient(mlflow_server)
    experiment = f"report-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id, run_name="sweep", tags={"entry_point": "sweep"}).info.run_id
    add_child(client, experiment_id, parent, "fp4", 0, status="FAILED")
    proc = mlflow_run(mlflow_server, experiment, {}, entry_point="report")  # no -P experiment: --experiment-name's
    assert proc.returncode != 0
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "training runs FAILED, nothing to report" in error
    assert "Traceback" not in proc.stderr + proc.stdout
    (run,) = [r for r in runs_of(client, experiment) if r.data.tags.get("mlflow.project.entryPoint") == "report"]
    assert run.info.status == "FAILED"  # the run `mlflow run` opened is not left RUNNING
