r"""Benchmark the trainer against HF Trainer + PEFT; write docs/benchmarks.md and bench-results.json.

make bench                                    # = python -m entrypoints.bench (the defaults)
python -m entrypoints.bench --modes bf16 --steps 4 --warmup_steps 1 --repeats 1 --profile_steps 0 \
    --output /tmp/benchmarks.md --json /tmp/bench-results.json          # a quick check
python -m entrypoints.bench --device cuda --model llama-3.2-1b-shape    # on a GPU, random weights

Every flag, its default and its meaning: the `bench` section of configs/default.yaml. Every measurement runs in
its own process; lora_efficiency/bench/ says what is measured and how. The table goes to stdout and into --output
as a block of its own (same device kind and model: replaced; other text kept).
"""

from __future__ import annotations

import shlex

from lora_efficiency.cli import run_cli
from lora_efficiency.config import BenchConfig, parse_args
from lora_efficiency.errors import printable


def main(argv: list[str]) -> None:
    cfg = parse_args(BenchConfig, "bench", argv, description=__doc__)
    # lazy: after parsing: bad input exits in ~0.3 s, before torch, transformers and MLflow load (~6 s)
    from lora_efficiency import bench
    from lora_efficiency.devices import resolve_device

    device = str(resolve_device(cfg.device))  # auto -> cuda or cpu; cuda without a GPU is a UserError
    command = shlex.join(["python", "-m", "entrypoints.bench", *argv])
    results = bench.run_benchmark(
        modes=cfg.mode_list,
        steps=cfg.steps,
        warmup_steps=cfg.warmup_steps,
        repeats=cfg.repeats,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        ref_batch_size=cfg.ref_batch_size,
        model=cfg.model,
        data=cfg.data,
        device=device,
        profile_steps=cfg.profile_steps,
        startup_launches=cfg.startup_launches,
    )
    block = bench.render_benchmarks_block(results, command)
    print(block)
    bench.write_markdown(cfg.output, block, bench.block_key(results))
    bench.write_json(results, cfg.json, command)
    print(printable(f"wrote {cfg.output} and {cfg.json}"))


if __name__ == "__main__":
    run_cli(main)
