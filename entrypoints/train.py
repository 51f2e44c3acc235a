"""Train one LoRA/QLoRA adapter on the shared trainer and log everything to MLflow.

mlflow run . -e train --env-manager local -P rank=16 -P target_modules=attention -P quantization=nf4
python -m entrypoints.train --rank 16 --max_steps 5          # the same, without `mlflow run`
python -m entrypoints.train --max_steps 500 --checkpoint_every 50           # a checkpoint artifact every 50 steps
python -m entrypoints.train --max_steps 500 --resume_from <that run's id>   # after a crash: from its latest one
python -m entrypoints.train --num_processes 2                # one DDP training over 2 GPUs (2 gloo processes on a CPU)
accelerate launch --multi_gpu --num_processes 2 -m entrypoints.train      # the same, started by accelerate
python -m entrypoints.train --num_processes 2 --sharding fsdp  # the base and adapter sharded over the 2 (FSDP2)
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from lora_efficiency import distributed
from lora_efficiency.cli import run_cli
from lora_efficiency.config import TrainConfig, parse_args
from lora_efficiency.errors import UserError, printable


def main(argv: list[str]) -> None:
    cfg = parse_args(TrainConfig, "train", argv, description=__doc__)
    if cfg.num_processes > 1 and not distributed.launched():
        return distributed.launch(cfg.num_processes, "entrypoints.train", argv)  # rank 0 logs the run
    if distributed.launched() and cfg.num_processes not in (1, distributed.world_size()):
        raise UserError(
            f"num_processes={cfg.num_processes} is invalid under a launcher of {distributed.world_size()} processes: "
            f"1 or {distributed.world_size()}"
        )
    # lazy: after parsing: bad input exits before transformers, peft and MLflow load (~4 s more)
    from transformers.utils import logging as hf_logging

    from lora_efficiency.devices import resolve_device
    from lora_efficiency.models import resolve_model
    from lora_efficiency.tracking import check_tracking_store, download_checkpoint, start_run
    from lora_efficiency.trainer import NullTracker, train

    hf_logging.disable_progress_bar()
    resolve_device(cfg.device)  # a device torch cannot see fails here, before a run exists
    if distributed.is_main():  # before the model and data: an early exit below leaves no killed run RUNNING either
        check_tracking_store()
    source = resolve_model(cfg.model)  # converts the bundled model once (~20 s) before a run exists
    adapter = f"r{cfg.rank}-{cfg.target_modules}" if cfg.method == "lora" else "full"
    name = f"{adapter}-{cfg.quantization}-s{cfg.seed}"
    if distributed.world_size() > 1:
        name += f"-x{distributed.world_size()}"
    main_rank = distributed.is_main()
    what = f"LoRA r={cfg.rank} on {cfg.target_modules}" if cfg.method == "lora" else "Full fine-tuning"
    description = (
        f"{what} of {source.model_id}, base stored as {cfg.quantization}, seed {cfg.seed}, {cfg.max_steps} steps "
        f"on data {cfg.data or 'bundled-instruct'}; the adapter is the MLflow model named"
        " after its configuration and seed"
    )
    run = (
        start_run(run_name=name, entry_point="train", description=description)
        if main_rank
        else contextlib.nullcontext(NullTracker())
    )
    with run as tracker:
        resume_dir = None
        if cfg.resume_from and not Path(cfg.resume_from).is_dir():  # a run id: its latest checkpoint artifact
            tracker.set_tags({"resumed_from_run": cfg.resume_from})
            resume_dir = download_checkpoint(cfg.resume_from)  # before the model loads; cfg keeps the run id
        result = train(cfg, model=source, tracker=tracker, resume_dir=resume_dir)
        if main_rank and cfg.method == "lora":  # the adapter as a pyfunc (base by hub id), named after its run
            from lora_efficiency.mlflow_model import log_adapter_model, model_name

            t0 = time.perf_counter()
            named = model_name(
                rank=cfg.rank, target_modules=cfg.target_modules, quantization=cfg.quantization, seed=cfg.seed
            )
            logged = log_adapter_model(result.adapter_dir, quantization=cfg.quantization, name=named)
            tracker.log_metrics({**logged, "time/model_logging_s": time.perf_counter() - t0})
    if not main_rank:
        return
    m = result.metrics
    print(
        f"finished {printable(name)}: eval/loss {m['eval/loss']:.4f}, eval/perplexity {m['eval/perplexity']:.3f}, "
        f"peak {m['memory/peak_mb']:.0f} MB, {m['perf/train_tokens_per_second']:.0f} tokens/s"
    )


if __name__ == "__main__":
    run_cli(main)
