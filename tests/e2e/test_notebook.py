"""notebooks/compare_runs.ipynb runs top to bottom (nbclient, a real kernel) against a store the test builds."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.report_store import build_study

pytestmark = pytest.mark.e2e
NOTEBOOK = ROOT / "notebooks" / "compare_runs.ipynb"


def test_notebook_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_notebook_runs_against_a_tracking_store(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    build_study(MlflowClient(uri), "notebook-study")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the kernel inherits this process's environment
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "notebook-study")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # raises CellExecutionError, with the cell and its traceback, if any cell fails
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps(outputs)
    assert "r8 attention nf4" in text  # the tables
    # the findings: every one a verdict (better, worse, equivalent within the margin, or cannot tell)
    assert " vs " in text and any(verdict in text for verdict in ("cannot tell", "equivalent", "better", "worse"))
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the two charts
