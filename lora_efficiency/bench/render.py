"""What the benchmark writes: docs/bench-results.json (every figure, for scripts) and one block of
docs/benchmarks.md per device kind and model (the run's header, a summary against the targets, a table per
mode), put between its markers so that the text around it is kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

# Targets of the performance issue on the 2-core CPU (SmolLM2-135M, r=16, attention); a GPU table is shown
# without them.
TARGETS = {
    "tokens_per_second_ratio_strong": {"bf16": 1.5, "nf4": 1.5},
    "tokens_per_second_ratio": {"bf16": 3.0, "nf4": 3.0},
    "peak_memory_ratio_strong": 0.6,
    "mfu": {"bf16": 0.55},  # issue 29
    "tracking_overhead": 0.02,
    "startup_s": 4.0,
}

HEADER = """# Benchmarks

The project's trainer against two references written with the same libraries (Hugging Face `Trainer` + PEFT):
the naive one of the quick-start guides (random batches padded to their longest, loss on every token) and the
strong one a careful user writes (completion-only labels, length-grouped batches, gradient checkpointing as the
project has it), written by `make bench` (`lora_efficiency/bench/` says what is measured and how). Each block
below is replaced when the benchmark runs again on the same kind of device and model; text outside the blocks is
kept.
"""


def write_json(results: dict, path: str | Path, command: str) -> None:
    Path(path).write_text(json.dumps({"command": command, **results}, indent=2) + "\n")


def render_benchmarks_block(results: dict, command: str) -> str:
    """One block of docs/benchmarks.md: the run's header, a summary against the targets, a table per mode."""
    cpu = results["settings"]["device"] == "cpu"
    lines = [*_header(results, command), "", *_summary(results, cpu), *_startup(results.get("startup"), cpu)]
    for mode, x in results["modes"].items():
        lines += _mode_section(mode, x, results["settings"])
    return "\n".join(lines) + "\n"


def _header(results: dict, command: str) -> list[str]:
    """Where and with what it ran; the recipe, data and batch of both sides; the matmul rates and FLOPs."""
    s, m, r, d = results["settings"], results["machine"], results["matmul"], results["data"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    flops = results["flops_per_token"]
    reference_batch = (
        f"pads them to their longest (per_device_train_batch_size {s['reference_batch_size']})."
        if s["reference_grad_accum"] == 1
        else f"takes {s['reference_grad_accum']} micro-batches of {s['reference_batch_size']} examples padded "
        "to their longest (gradient accumulation)."
    )
    return [
        f"## {s['model_id']} on {'the CPU' if s['device'] == 'cpu' else 'a GPU'} ({where}), {results['date']}",
        "",
        f"`{command}` ({results['wall_s'] / 60:.0f} min). "
        + ", ".join(f"{k} {val}" for k, val in results["versions"].items())
        + f"; {m['torch_threads']} torch threads, {m['memory_gb']} GB RAM.",
        "",
        f"LoRA r={s['lora']['rank']}, alpha {s['lora']['alpha']:g}, dropout {s['lora']['dropout']:g} on "
        f"q,k,v,o; lr {s['lr']:g}, cosine, {s['warmup_ratio']:.0%} warm-up; {s['steps']} optimizer steps of which "
        f"the first {s['warmup_steps']} are left out, {s['repeats']} repeats, medians. Data: "
        f"{d['data_name']} ({d['train_examples']:,} examples of "
        f"{d['example_tokens']['min']}-{d['example_tokens']['max']} tokens). Batch: "
        f"~{d['examples_per_step']:.0f} examples a step on every side: the project packs them into "
        f"{s['batch_size']} rows of {s['seq_len']} tokens, each reference " + reference_batch,
        "",
        f"Matmul rate measured first ({r['size']}^3, median of 10): bf16 {r['bf16_flops'] / 1e9:,.0f} GFLOP/s, fp32 "
        f"{r['fp32_flops'] / 1e9:,.0f} GFLOP/s. MFU = the FLOPs a side performs per real token x its real "
        "tokens/s / the bf16 rate (`figures.performed_flops_per_token`): positions computed (padding included) x "
        f"(4 x {flops['frozen_params'] / 1e6:.1f} M frozen linear + 6 x {flops['lora_params'] / 1e6:.2f} M LoRA "
        f"weights) + positions the head runs on x (4, or 6 where it is recomputed) x {flops['head_params'] / 1e6:.1f}"
        f" M + attention pairs x 12 L H Q ({flops['attention_per_pair'] / 1e3:,.0f} k), +50% on the layers' "
        "forward share under gradient checkpointing. The head runs on every position on the references, on the "
        "loss targets only in the project; attention covers each padded micro-batch's width on the references, "
        f"each example (mean {results['context_tokens']:.0f} tokens, token-weighted) in the project."
        + _ceiling(results),
    ]


def _ceiling(results: dict) -> str:
    """The MFU a step of nothing but the frozen layers' products would reach (figures.model_matmul_rate)."""
    shaped = results.get("model_matmul")
    if not shaped:  # results written before 2026-12-05
        return ""
    rate, square = shaped["bf16_flops"], results["matmul"]
    return (
        f" The model's own products at the project's step shape (its {shaped['layers']} frozen linear layers, "
        f"{shaped['rows']:,} rows, forward and input gradient, {shaped['shapes']} distinct shapes, FLOP-weighted) "
        f"run at {rate / 1e9:,.0f} GFLOP/s, {rate / square['bf16_flops']:.0%} of the {square['size']}^3 "
        "rate: the MFU of a step that did nothing else, a ceiling the rest of the step only lowers."
    )


def _summary(results: dict, cpu: bool) -> list[str]:
    """A row per mode: the ratios against the targets (on the CPU, where the targets were set)."""
    lines = [
        "| base | real tokens/s, project / strong reference (the faster of eager and torch_compile) | project / "
        "naive reference | peak memory, project / that strong reference | per-example attention, tokens/s against "
        "masked sdpa | tracking + sampling overhead (95% interval) | MFU, project / strong / naive |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, x in results["modes"].items():

        def target(key, m=mode):
            t = TARGETS[key] if cpu else None
            return t.get(m) if isinstance(t, dict) else t

        interval = x.get("tracking_overhead_interval")
        spread = f" ({interval[0]:+.1%} to {interval[1]:+.1%})" if interval else ""
        overhead_verdict = _interval_verdict(interval, target("tracking_overhead")) if interval else None
        mfu = x["mfu_by_side"]
        lines.append(
            f"| {mode} | {x['tokens_per_second_ratio_strong']:.2f}"
            f"{_verdict(x['tokens_per_second_ratio_strong'], target('tokens_per_second_ratio_strong'), True)} "
            f"({'compiled' if x['strong_reference'] == 'reference_strong_compiled' else 'eager'}) "
            f"| {x['tokens_per_second_ratio']:.2f}"
            f"{_verdict(x['tokens_per_second_ratio'], target('tokens_per_second_ratio'), True)} "
            f"| {x['peak_memory_ratio_strong']:.2f}"
            f"{_verdict(x['peak_memory_ratio_strong'], target('peak_memory_ratio_strong'), False)} "
            f"| {x['per_example_attention_speedup']:.2f} "
            f"| {x['tracking_overhead']:+.1%}{spread}"
            f"{overhead_verdict or _verdict(x['tracking_overhead'], target('tracking_overhead'), False)} "
            f"| {_pct(mfu['project'])}{_verdict(mfu['project'], target('mfu'), True)}"
            + (f" (ceiling {_pct(x['mfu_ceiling'])})" if "mfu_ceiling" in x else "")
            + f" / {_pct(mfu[x['strong_reference']])} / {_pct(mfu['reference'])} |"
        )
    return lines


def _startup(startup: dict | None, cpu: bool) -> list[str]:
    """The second run of a sweep, launch to first step (forked from the warm server, and as a fresh process),
    and a fresh one's import time; nothing without two launches."""
    if not startup or startup.get("second_run_s") is None:
        return []
    target = TARGETS["startup_s"] if cpu else None
    launches = ", ".join(f"{t:.1f}" for t in startup["launches_s"])
    lines = [
        "",
        f"Second run of a sweep, launch to first step: **{startup['second_run_s']:.1f} s**"
        f"{_verdict(startup['second_run_s'], target, False)} (a child forked from the warm server, as a local sweep "
        f"launches it, caches warm; launches: {launches} s; the server's own start, once a sweep: "
        f"{startup['server_start_s']:.1f} s)."
        + ("" if startup.get("forked", True) else " Forking was off (unsafe): these launches were fresh processes."),
    ]
    if startup.get("fresh_second_run_s") is not None:
        fresh = ", ".join(f"{t:.1f}" for t in startup["fresh_launches_s"])
        lines.append(
            f"As a fresh `python -m entrypoints.train` (`warm_children=false`, and every Ray task): "
            f"{startup['fresh_second_run_s']:.1f} s (launches: {fresh} s)."
        )
    if "imports" in startup:
        packages = ", ".join(f"{k} {t:.1f}" for k, t in startup["imports"]["packages_s"].items())
        lines.append(
            f"Imports take {startup['imports']['total_s']:.1f} s of a fresh one (`-X importtime`, by package: "
            f"{packages} s)."
        )
    return lines


def _mode_section(mode: str, x: dict, s: dict) -> list[str]:
    """### MODE base: every side's figures side by side, what tracking costs, and the profiles if any."""
    flipped = "project_eager" if x["project_compile"] else "project_compiled"
    names = (
        "reference",
        "reference_strong",
        "reference_strong_compiled",
        "project",
        "project_untracked",
        "project_sdpa",
        flipped,
    )
    compiled = ", compiled" if x["project_compile"] else ""
    heads = (
        "naive reference" + (", checkpointing on" if x["reference_gradient_checkpointing"] else ""),
        "strong reference" + (", checkpointing on" if x["reference_strong_gradient_checkpointing"] else ""),
        "strong reference, torch_compile",
        "project" + compiled,
        "project, untracked" + compiled,
        "project, untracked, masked sdpa" + compiled,
        "project, untracked, " + ("eager" if x["project_compile"] else "compiled"),
    )
    sides = [x[n] for n in names]

    def row(label, fmt):
        return f"| {label} | " + " | ".join(fmt(side) for side in sides) + " |"

    lines = [
        "",
        f"### {mode} base",
        "",
        "| | " + " | ".join(heads) + " |",
        "|" + " --- |" * (len(names) + 1),
        row(
            "real tokens/s (range over repeats)",
            lambda v: (
                f"{v['tokens_per_second']:,.0f} ({v['tokens_per_second_range'][0]:,.0f}-"
                f"{v['tokens_per_second_range'][1]:,.0f})"
            ),
        ),
        row("step time, s", lambda v: f"{v['step_time_s']:.3f}"),
        row("real tokens a step", lambda v: f"{v['tokens_per_step']:,.0f}"),
        row("padding, share of positions", lambda v: _pct(v["padding_fraction"])),
        row("peak memory, MB", lambda v: f"{v['peak_memory_mb']:,.0f}"),
        row("FLOPs performed per real token, M", lambda v: f"{v['performed_flops_per_token'] / 1e6:,.0f}"),
        "| MFU (bf16 rate) | " + " | ".join(_pct(x["mfu_by_side"][n]) for n in names) + " |",
        "",
        f"Tracking and memory sampling: {x['project']['step_time_s']:.3f} s a step with them, "
        f"{x['project_untracked']['step_time_s']:.3f} s without ({x['tracking_overhead']:+.1%}, the median of the "
        f"repeats' paired differences on the same batches); the logging call itself takes "
        f"{x['logging_ms_per_step']:.2f} ms a step, the rest runs in MLflow's and the sampler's threads.",
        "",
        f"Compiling: the strong reference's torch_compile=True gives {x['reference_strong_compile_speedup']:.2f}x "
        f"its eager tokens/s; the project's compile=true {x['compile_speedup']:.2f}x its compile=false (untracked, "
        f"the same batches). The project is compared with the "
        f"{'compiled' if x['strong_reference'] == 'reference_strong_compiled' else 'eager'} strong reference, "
        "the faster.",
    ]
    for side, table in x.get("profiles", {}).items():
        lines += [
            "",
            f"<details><summary>{mode}, {side}: torch.profiler over {_steps(s)}, by self time</summary>",
            "",
            "```",
            table.rstrip(),
            "```",
            "",
            "</details>",
        ]
    return lines


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _interval_verdict(interval: list[float], target: float | None) -> str:
    """A lower-is-better target judged on a 95% interval: met when all of it is at or under the target, short when
    all of it is over, cannot tell when it straddles the target."""
    if target is None:
        return ""
    low, high = interval
    word = "met" if high <= target else "short" if low > target else "cannot tell"
    return f" ({word}: <= {target:g})"


def _verdict(value: float, target: float | None, higher_is_better: bool) -> str:
    if target is None:
        return ""
    met = value >= target if higher_is_better else value <= target
    return f" ({'met' if met else 'short'}: {'>=' if higher_is_better else '<='} {target:g})"


def _steps(s: dict) -> str:
    first, last = s["warmup_steps"] + 1, s["warmup_steps"] + s["profile_steps"]
    return f"step {first}" if first == last else f"steps {first}-{last}"


def write_markdown(path: str | Path, block: str, key: str) -> None:
    """Put `block` between its markers in `path`: replaced if there, appended if not; other text is kept."""
    path = Path(path)
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    marked = f"{start}\n{block.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + marked.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + marked
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def block_key(results: dict) -> str:
    """The block's marker: one block per device kind (cpu, cuda) and model folder name."""
    s = results["settings"]
    return f"{'cpu' if s['device'] == 'cpu' else 'cuda'}-{re.sub(r'[^A-Za-z0-9.-]', '_', Path(s['model']).name)}"
