"""The whole study: prepare the data, evaluate the base model alone, run the rank, module and quantization sweeps,
then write the report (reports/<experiment>/report.md, .html and charts; also a run tagged report=true).

    make study                                                   # = the line below
    mlflow run . -e main --env-manager local -P profile=quick
    mlflow run . -e main --env-manager local -P profile=full     # on a GPU
    mlflow run . -e main --env-manager local -P backend=ray -P max_concurrent=2   # the sweeps' children on Ray
Started again after an interruption, it runs only what is missing (finished runs are found by their keys).
"""

from __future__ import annotations

from lora_efficiency.cli import run_cli
from lora_efficiency.config import StudyConfig, parse_args


def main(argv: list[str]) -> None:
    cfg = parse_args(StudyConfig, "main", argv, description=__doc__)
    # lazy: after parsing: bad input exits in ~0.3 s, before torch, transformers and MLflow load (~6 s)
    from transformers.utils import logging as hf_logging

    from lora_efficiency.design import contrasts_json
    from lora_efficiency.ray_backend import check_backend
    from lora_efficiency.study import load_study, report_study, run_study
    from lora_efficiency.tracking import start_run

    hf_logging.disable_progress_bar()
    check_backend(cfg.backend, cfg.ray_address)  # a cluster refused before anything is prepared
    study = load_study(cfg)  # every sweep file and child checked, one data set prepared, before any run opens
    description = f"The study ({cfg.profile or 'default'} profile): baselines, sweeps and the report, as child runs"
    # no system metrics here: the parent waits; each child run samples its own
    with start_run(
        run_name=f"study-{cfg.profile or 'default'}", entry_point="main", system_metrics=False, description=description
    ) as tracker:
        tracker.log_params(vars(cfg))
        tracker.set_tags(
            {
                "study_profile": cfg.profile,
                "data_fingerprint": study.fingerprint,
                # the report reads the declared contrasts back from here: the profile file may change later
                "study_contrasts": contrasts_json(study.contrasts),
            }
        )
        if study.contrasts:  # the file beside the tag: what a person opens in the UI
            tracker.log_text(contrasts_json(study.contrasts), "contrasts.json")
        failures = run_study(study, tracker.run_id)
        tracker.set_tags({"runs_failed": len(failures)})
    report_study(study, tracker.run_id, failures)


if __name__ == "__main__":
    run_cli(main)
