"""A benchmark worker: `python -m lora_efficiency.bench KIND SPEC_JSON OUT_PATH` runs worker KIND on the spec and
writes its result to OUT_PATH as JSON (orchestration.run_worker starts these, one process per measurement)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lora_efficiency.bench.reference import reference_worker
from lora_efficiency.bench.workers import project_worker, setup_worker

WORKERS = {"setup": setup_worker, "reference": reference_worker, "project": project_worker}

if __name__ == "__main__":
    kind, spec_json, out_path = sys.argv[1:4]
    result = WORKERS[kind](json.loads(spec_json))
    Path(out_path).write_text(json.dumps(result))
