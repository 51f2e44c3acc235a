"""Merge a LoRA adapter into its (unquantized) base and write one model folder, loadable without peft.

python -m entrypoints.merge --run_id models:/<experiment>@best --output merged/
python -m entrypoints.merge --run_id <train run id> --output merged/
python -m entrypoints.merge --adapter path/to/adapter --model smollm2-135m --output merged/ --dtype fp32
"""

from __future__ import annotations

from lora_efficiency.cli import run_cli
from lora_efficiency.config import MergeConfig, parse_args
from lora_efficiency.errors import printable


def main(argv: list[str]) -> None:
    cfg = parse_args(MergeConfig, "merge", argv, description=__doc__)
    # lazy: after parsing: bad input exits in ~0.3 s, before torch, transformers and MLflow load (~6 s)
    from transformers.utils import logging as hf_logging

    from lora_efficiency.inference import check_adapter_folder, download_adapter, merge, resolve_run_ref, train_run
    from lora_efficiency.names import BUNDLED_MODEL
    from lora_efficiency.tracking import check_tracking_store

    hf_logging.disable_progress_bar()
    model = cfg.model
    if cfg.run_id:
        check_tracking_store()  # an unreachable server: one line in ~3 s, not a hang in MLflow's retries
        run_id = resolve_run_ref(cfg.run_id)  # a run id, runs:/<id>/model or models:/<name>@<alias>
        model = model or train_run(run_id).data.params.get("model", "")
        adapter = download_adapter(run_id)
    else:
        adapter = check_adapter_folder(cfg.adapter)
    out = merge(model=model or BUNDLED_MODEL, adapter=adapter, output_dir=cfg.output, dtype=cfg.dtype)
    print(f"merged model written to {printable(out)}")


if __name__ == "__main__":
    run_cli(main)
