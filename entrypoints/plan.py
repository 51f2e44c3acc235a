r"""Predict a training run's peak memory from the model's config alone, before anything loads, and say if it fits.

python -m entrypoints.plan --model smollm2-135m --rank 16 --target_modules attention --quantization nf4 \
    --batch_size 4 --seq_len 512
python -m entrypoints.plan --device cuda --budget_mb 24576     # the default run on a 24 GB GPU

Unset settings take the `train` defaults of configs/default.yaml, so a plain `python -m entrypoints.plan` plans
the default run. --target_fraction is the share of positions that are loss targets: 1.0 (plain text, or
train_on_prompt) is the upper bound; the bundled instruct set packed to 512 tokens has 0.17.
"""

from __future__ import annotations

import argparse

from lora_efficiency.cli import run_cli

# the train settings the estimate depends on, with their types
TRAIN_FIELDS = {
    "model": str,
    "rank": int,
    "target_modules": str,
    "quantization": str,
    "double_quant": bool,
    "batch_size": int,
    "seq_len": int,
    "dropout": float,
    "gradient_checkpointing": bool,
    "device": str,
    "trust_remote_code": bool,
}


def parse(argv: list[str]) -> dict:
    """Typed settings over the train defaults; every problem is collected, then raised as one ConfigError."""
    from lora_efficiency.config import convert, read_defaults, train_problems
    from lora_efficiency.errors import ConfigError, UserError, invalid

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in [*TRAIN_FIELDS, "target_fraction", "budget_mb"]:
        parser.add_argument(f"--{name}", default=None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        allowed = ", ".join([*TRAIN_FIELDS, "target_fraction", "budget_mb"])
        raise UserError(f"unknown argument {' '.join(unknown)!r}: allowed are --{{{allowed}}}")
    defaults = read_defaults("train")
    raw = {name: getattr(args, name) if getattr(args, name) is not None else defaults[name] for name in TRAIN_FIELDS}
    raw["target_fraction"] = args.target_fraction if args.target_fraction is not None else 1.0
    raw["budget_mb"] = args.budget_mb
    kinds = {**TRAIN_FIELDS, "target_fraction": float, "budget_mb": float}
    settings, problems = {}, []
    for name, value in raw.items():
        if value is None:  # budget_mb unset: the machine's memory
            settings[name] = None
            continue
        converted, problem = convert(name, value, kinds[name])
        problems += [problem] if problem else []
        settings[name] = converted
    problems += train_problems({k: v for k, v in settings.items() if k in TRAIN_FIELDS and v is not None})
    if settings["target_fraction"] is not None and not 0 < settings["target_fraction"] <= 1:
        problems.append(invalid("target_fraction", settings["target_fraction"], "a number in (0, 1]"))
    if settings["budget_mb"] is not None and settings["budget_mb"] <= 0:
        problems.append(invalid("budget_mb", settings["budget_mb"], "a number of MB > 0"))
    if problems:
        raise ConfigError(problems)
    return settings


def main(argv: list[str]) -> None:
    s = parse(argv)
    import psutil
    import torch
    from transformers import AutoConfig

    from lora_efficiency.errors import UserError
    from lora_efficiency.models import resolve_model
    from lora_efficiency.planner import MB, estimate

    device = s["device"] if s["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_model(s["model"])
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=s["trust_remote_code"])
    except (OSError, ValueError) as exc:
        raise UserError(f"model={s['model']!r}: no config could be read ({str(exc).splitlines()[0][:200]})") from None
    result = estimate(
        config,
        rank=s["rank"],
        target_modules=s["target_modules"],
        quantization=s["quantization"],
        batch_size=s["batch_size"],
        seq_len=s["seq_len"],
        double_quant=s["double_quant"],
        device=device,
        gradient_checkpointing=s["gradient_checkpointing"],
        target_fraction=s["target_fraction"],
        dropout=s["dropout"],
    )
    if s["budget_mb"] is not None:
        budget, budget_name = s["budget_mb"], "--budget_mb"
    elif device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={device!r} but torch sees no CUDA device here: pass --budget_mb (the GPU's MB)")
        budget, budget_name = torch.cuda.mem_get_info(torch.device(device))[1] / MB, "GPU memory"
    else:
        budget, budget_name = psutil.virtual_memory().available / MB, "available RAM"

    print(
        f"{source.model_id}: rank {s['rank']}, {s['target_modules']}, {s['quantization']}, "
        f"{s['batch_size']} x {s['seq_len']} tokens, {device}, {result.trainable_params:,} LoRA parameters"
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
