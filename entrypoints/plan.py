r"""Predict a training run's peak memory from the model's config alone, before anything loads, and say if it fits.

python -m entrypoints.plan --model smollm2-135m --rank 16 --target_modules attention --quantization nf4 \
    --batch_size 4 --seq_len 512
python -m entrypoints.plan --device cuda --budget_mb 24576     # the default run on a 24 GB GPU
python -m entrypoints.plan --design standard --spread_experiment study-standard   # seeds for declared contrasts
python -m entrypoints.plan --design standard --sd 0.0148

Unset settings take the `train` defaults of configs/default.yaml, so a plain `python -m entrypoints.plan` plans
the default run (its `plan` section holds --target_fraction and --budget_mb). --target_fraction is the share of
positions that are loss targets: 1.0 (plain text, or train_on_prompt) is the upper bound; the bundled instruct set
packed to 512 tokens has 0.17. --budget_mb 0 (the default): the GPU's memory on cuda, else the available RAM.

--design <profile> plans seeds instead of memory: for each contrast the profile declares, the seeds that give 80%
power after Holm over them, the power of the profile's own seeds, and the cost at the measured training time of
the earlier runs in --spread_experiment (their paired spread), or at a given --sd (lora_efficiency/report/power.py).
"""

from __future__ import annotations

from dataclasses import asdict

from lora_efficiency.cli import run_cli
from lora_efficiency.config import PlanConfig, parse_args


def main(argv: list[str]) -> None:
    cfg = parse_args(PlanConfig, "plan", argv, description=__doc__)
    if cfg.seeds.design:
        design(cfg)
        return
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


def design(cfg: PlanConfig) -> None:
    """The seeds the profile's declared contrasts need, from a given sd or an experiment's earlier runs."""
    # lazy: after parsing, like main's: bad input exits before the report's MLflow and scipy load
    from lora_efficiency.config import read_defaults
    from lora_efficiency.design import parse_contrasts
    from lora_efficiency.errors import UserError, printable
    from lora_efficiency.report.power import plan_lines
    from lora_efficiency.sweep import load_profile

    profile = load_profile(cfg.seeds.design)
    contrasts = parse_contrasts(profile.get("contrasts"), where=f"profile={cfg.seeds.design!r}")
    if not contrasts:
        raise UserError(f"design={cfg.seeds.design!r}: the profile declares no contrasts (its `contrasts` list)")
    seeds = len(profile.get("seeds") or [0])
    configs, source = [], f"sd {cfg.seeds.sd:g} given"
    if not cfg.seeds.sd:
        import mlflow

        from lora_efficiency.report import fetch_scope, group_configurations
        from lora_efficiency.report.runs import fetch_per_example_losses
        from lora_efficiency.tracking import check_tracking_store

        check_tracking_store()
        client = mlflow.MlflowClient()
        scope = fetch_scope(client, experiment=cfg.seeds.spread_experiment, sweep_run_id=cfg.seeds.spread_run_id)
        configs = group_configurations(scope.runs)
        losses = fetch_per_example_losses(client, scope.runs)
        for c in configs:
            c.losses = {r.seed: losses[r.run_id] for r in c.runs if r.run_id in losses}
        source = f"spread from experiment {cfg.seeds.spread_experiment}: {len(scope.runs)} runs"
    defaults = {**read_defaults("train"), **(profile.get("train") or {})}
    print(printable(f"profile {cfg.seeds.design} ({source}):"))
    for line in plan_lines(contrasts, seeds, configs=configs, defaults=defaults, sd=cfg.seeds.sd):
        print(printable(line))


if __name__ == "__main__":
    run_cli(main)
