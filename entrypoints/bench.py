r"""Benchmark the trainer against HF Trainer + PEFT; write docs/benchmarks.md and bench-results.json.

make bench                                    # = python -m entrypoints.bench (the defaults below)
python -m entrypoints.bench --modes bf16 --steps 4 --warmup_steps 1 --repeats 1 --profile_steps 0 \
    --output /tmp/benchmarks.md --json /tmp/bench-results.json          # a quick check
python -m entrypoints.bench --device cuda --model llama-3.2-1b-shape    # on a GPU, random weights

Every measurement runs in its own process; lora_efficiency/bench.py says what is measured and how. The table
goes to stdout and into --output as a block of its own (same device kind and model: replaced; other text kept).
"""

from __future__ import annotations

import argparse
import shlex

from lora_efficiency.cli import run_cli

# name: (type, default, help)
FIELDS = {
    "modes": (str, "bf16,nf4,int8", "comma list of base storages: bf16, nf4, fp4, int8, fp32"),
    "steps": (int, 8, "optimizer steps per run, warm-up included"),
    "warmup_steps": (int, 2, "first steps left out of every figure (>= 1)"),
    "repeats": (int, 3, "runs per side and mode; medians are reported"),
    "batch_size": (int, 4, "the project's packed rows per step"),
    "seq_len": (int, 512, "tokens per packed row; the longest example either side sees"),
    "ref_batch_size": (int, 0, "0: the reference takes a step's examples in one batch; N: micro-batches of N"),
    "model": (str, "smollm2-135m", "smollm2-135m, a local HF folder, or llama-3.2-1b-shape (random weights)"),
    "data": (str, "", "'' for the bundled instruction set, or what train's data accepts"),
    "device": (str, "auto", "auto, cpu, cuda or cuda:N"),
    "profile_steps": (int, 2, "steps profiled with torch.profiler per side and mode (0: none)"),
    "startup_launches": (int, 3, "launches of entrypoints.train to time start to first step (0: none)"),
    "output": (str, "docs/benchmarks.md", "markdown file the table goes into"),
    "json": (str, "docs/bench-results.json", "the same figures for scripts"),
}


def parse(argv: list[str]) -> dict:
    """Typed settings; every problem is collected, then raised as one ConfigError."""
    from lora_efficiency.bench import MODES, RANDOM_SHAPES
    from lora_efficiency.config import DEVICE, convert, data_reference_ok
    from lora_efficiency.errors import ConfigError, invalid
    from lora_efficiency.models import model_name_problem

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (_, default, text) in FIELDS.items():
        parser.add_argument(f"--{name}", default=str(default), help=f"{text} (default {default!r})")
    args = parser.parse_args(argv)
    s, problems = {}, []
    for name, (kind, _, _) in FIELDS.items():
        value, problem = convert(name, getattr(args, name), kind)
        problems += [problem] if problem else []
        s[name] = value
    if s["modes"] is not None:
        s["modes"] = [m.strip() for m in s["modes"].split(",") if m.strip()]
        if not s["modes"] or any(m not in MODES for m in s["modes"]):
            problems.append(invalid("modes", args.modes, f"a comma list of {', '.join(MODES)}"))
    for name in ("repeats", "batch_size", "warmup_steps"):
        if s[name] is not None and s[name] < 1:
            problems.append(invalid(name, s[name], "an integer >= 1"))
    for name in ("ref_batch_size", "profile_steps", "startup_launches"):
        if s[name] is not None and s[name] < 0:
            problems.append(invalid(name, s[name], "an integer >= 0"))
    if s["steps"] is not None and s["warmup_steps"] is not None and s["steps"] <= s["warmup_steps"]:
        problems.append(invalid("steps", s["steps"], f"more than warmup_steps={s['warmup_steps']}"))
    if s["seq_len"] is not None and not 16 <= s["seq_len"] <= 131072:
        problems.append(invalid("seq_len", s["seq_len"], "an integer from 16 to 131072"))
    if s["model"] not in RANDOM_SHAPES and (problem := model_name_problem(s["model"])):
        problems.append(f"{problem}, or one of the random-weight shapes {', '.join(RANDOM_SHAPES)}")
    if not data_reference_ok(s["data"]):
        problems.append(invalid("data", s["data"], "'' (the bundled set), a known set name, a data file or folder"))
    if not DEVICE.fullmatch(s["device"]):
        problems.append(invalid("device", s["device"], "auto, cpu, cuda or cuda:N"))
    if problems:
        raise ConfigError(problems)
    return s


def main(argv: list[str]) -> None:
    s = parse(argv)
    import torch

    from lora_efficiency import bench
    from lora_efficiency.errors import UserError

    device = s["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but torch sees no CUDA device: allowed here are 'auto' and 'cpu'")
    command = shlex.join(["python", "-m", "entrypoints.bench", *argv])
    results = bench.run_benchmark(
        modes=s["modes"],
        steps=s["steps"],
        warmup_steps=s["warmup_steps"],
        repeats=s["repeats"],
        batch_size=s["batch_size"],
        seq_len=s["seq_len"],
        ref_batch_size=s["ref_batch_size"],
        model=s["model"],
        data=s["data"],
        device=device,
        profile_steps=s["profile_steps"],
        startup_launches=s["startup_launches"],
    )
    block = bench.render_markdown(results, command)
    print(block)
    bench.write_markdown(s["output"], block, bench.block_key(results))
    bench.write_json(results, s["json"], command)
    print(f"wrote {s['output']} and {s['json']}")


if __name__ == "__main__":
    run_cli(main)
