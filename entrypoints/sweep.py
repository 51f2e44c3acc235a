"""Run a sweep file: one parent run, one child run per (configuration, seed); resumable, failures isolated.

mlflow run . -e sweep --env-manager local -P config=configs/sweeps/rank.yaml -P profile=quick
python -m entrypoints.sweep --config configs/sweeps/modules.yaml --profile quick
python -m entrypoints.sweep --config configs/sweeps/rank.yaml --backend ray --max_concurrent 2   # local Ray
MLFLOW_TRACKING_URI=http://mlflow:5000 python -m entrypoints.sweep --config ... --backend ray --ray_address auto
"""

from __future__ import annotations

import json

from lora_efficiency.cli import run_cli
from lora_efficiency.config import SweepConfig, backend_options, parse_args
from lora_efficiency.errors import UserError, printable


def main(argv: list[str]) -> None:
    cfg = parse_args(SweepConfig, "sweep", argv, description=__doc__)
    # lazy: after parsing: bad input exits in ~0.3 s, before torch, transformers and MLflow load (~6 s)
    from transformers.utils import logging as hf_logging

    from lora_efficiency.ray_backend import check_backend
    from lora_efficiency.sweep import load_sweep, parent_tags, prepare_once, run_sweep
    from lora_efficiency.tracking import check_tracking_store, start_run

    hf_logging.disable_progress_bar()
    overrides = {k: v for k, v in (("data", cfg.data), ("device", cfg.device)) if v}
    check_backend(cfg.backend, cfg.ray_address)  # a cluster refused before anything is prepared
    sweep = load_sweep(cfg.config, profile=cfg.profile, overrides=overrides)  # every child checked before any runs
    check_tracking_store()  # a bad file never opens the store; from here an early exit leaves no killed run RUNNING
    prepared = prepare_once([sweep], where=f"config={cfg.config!r}")
    for line in sweep.alias_lines():
        print(printable(line), flush=True)
    print(
        printable(
            f"[{sweep.name}] {sweep.configurations} configurations x {len(sweep.seeds)} seeds = "
            f"{len(sweep.children)} runs"
            + (f" + {sweep.pilots} learning-rate pilots" if sweep.pilots else "")
            + (
                f" (+ up to {sweep.lr_grid.extend} per configuration past an edge)"
                if sweep.pilots and sweep.lr_grid.extend
                else ""
            )
            + f"; data {prepared.manifest['dataset']} ({prepared.path})"
        ),
        flush=True,
    )
    description = f"Sweep {sweep.name}: the parent of {len(sweep.children)} train runs (+ {sweep.pilots} pilots)"
    # no system metrics here: the parent waits; each child run samples its own
    with start_run(
        run_name=f"sweep-{sweep.name}", entry_point="sweep", system_metrics=False, description=description
    ) as tracker:
        tracker.log_params({**vars(cfg), "children_total": len(sweep.children) + sweep.pilots, "seeds": sweep.seeds})
        fingerprint = prepared.manifest["fingerprint"]
        tracker.set_tags(parent_tags(sweep, profile=cfg.profile, data_fingerprint=fingerprint, backend=cfg.backend))
        result = run_sweep(
            sweep,
            parent_run_id=tracker.run_id,
            data_fingerprint=prepared.manifest["fingerprint"],
            data_path=str(prepared.path),
            **backend_options(cfg),
            log=lambda line: print(printable(line), flush=True),
        )
        tracker.set_tags(result.tags())
        tracker.log_text(json.dumps(result.runs, indent=2), "sweep_runs.json")
    print(
        printable(
            f"[{sweep.name}] {result.finished} finished, {result.skipped} skipped (already FINISHED), "
            f"{result.failed} failed"
        )
    )
    if result.failed:
        raise UserError(
            f"{result.failed} of {result.total} runs of sweep {sweep.name!r} failed: "
            + " | ".join(result.failures)[:2000]
        )


if __name__ == "__main__":
    run_cli(main)
