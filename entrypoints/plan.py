r"""Predict a training run's peak memory from the model's config alone, before anything loads, and say if it fits.

python -m entrypoints.plan --model smollm2-135m --rank 16 --target_modules attention --quantization nf4 \
    --batch_size 4 --seq_len 512
python -m entrypoints.plan --device cuda --budget_mb 24576     # the default run on a 24 GB GPU

Unset settings take the `train` defaults of configs/default.yaml, so a plain `python -m entrypoints.plan` plans
the default run (its `plan` section holds --target_fraction and --budget_mb). --target_fraction is the share of
positions that are loss targets: 1.0 (plain text, or train_on_prompt) is the upper bound; the bundled instruct set
packed to 512 tokens has 0.17. --budget_mb 0 (the default): the GPU's memory on cuda, else the available RAM.
"""

from __future__ import annotations

from dataclasses import asdict

from lora_efficiency.cli import run_cli
from lora_efficiency.config import PlanConfig, parse_args


def main(argv: list[str]) -> None:
    cfg = parse_args(PlanConfig, "plan", argv, description=__doc__)
    # lazy: after parsing: bad input exits in ~0.3 s, before torch, transformers and MLflow load (~6 s)
    import psutil
    import torch
    from transformers import AutoConfig

    from lora_efficiency.configuration import planner_inputs
    from lora_efficiency.errors import UserError, printable
    from lora_efficiency.models import resolve_model
    from lora_efficiency.planner import MB, estimate

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_model(cfg.model)
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model={cfg.model!r}: no config could be read ({str(exc).splitlines()[0][:200]})") from None
    result = estimate(config, device=device, target_fraction=cfg.target_fraction, **planner_inputs(asdict(cfg)))
    if cfg.budget_mb:  # 0: the machine's
        budget, budget_name = cfg.budget_mb, "--budget_mb"
    elif device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={device!r} but torch sees no CUDA device here: pass --budget_mb (the GPU's MB)")
        budget, budget_name = torch.cuda.mem_get_info(torch.device(device))[1] / MB, "GPU memory"
    else:
        budget, budget_name = psutil.virtual_memory().available / MB, "available RAM"

    print(
        printable(
            f"{source.model_id}: rank {cfg.rank}, {cfg.target_modules}, {cfg.quantization}, "
            f"{cfg.batch_size} x {cfg.seq_len} tokens, {device}, {result.trainable_params:,} LoRA parameters"
        )
    )
    for name, mb in result.components().items():
        print(f"  {name.removesuffix('_mb'):<18}{mb:>10,.0f} MB")
    print(f"  {'total':<18}{result.total_mb:>10,.0f} MB")
    verdict = "fits" if result.total_mb <= budget else "does NOT fit"
    print(f"{verdict} in {budget:,.0f} MB ({budget_name}): {budget - result.total_mb:+,.0f} MB to spare")
    if device == "cpu":
        print("note: on the CPU the heap creeps over a run (one setting: +16 % from step 2 to step 40)")


if __name__ == "__main__":
    run_cli(main)
