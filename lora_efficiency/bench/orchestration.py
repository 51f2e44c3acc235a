"""The benchmark's run: one worker process per measurement, interleaved over the modes and repeats, then the
figures of each mode (medians over repeats, ratios, tracking overhead, MFU) and the results document that
render.py writes out."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

from scipy import stats

from lora_efficiency.bench.figures import machine, performed_flops_per_token, versions
from lora_efficiency.bench.recipe import ALPHA, DROPOUT, LR, RANK, TARGET_MODULES, WARMUP_RATIO
from lora_efficiency.bench.startup import measure_startup
from lora_efficiency.bench.workers import worker_env
from lora_efficiency.config import read_defaults
from lora_efficiency.subprocesses import die_with_parent

# The project's sides run with the train defaults (configs/default.yaml), compile included; one more side runs
# with compile flipped, so that compiling is measured as a lever of its own.
COMPILE_DEFAULT = bool(read_defaults("train")["compile"])
COMPILE_FLIPPED = "project_eager" if COMPILE_DEFAULT else "project_compiled"
# The sides of a mode, each run once per repeat: (name, worker kind, extra spec, tracked in MLflow).
# reference: HF Trainer + PEFT as the guides write it; reference_strong: as a careful user writes it
# (reference.py), and reference_strong_compiled: the same with sdpa and TrainingArguments(torch_compile=True); the
# project is compared with the faster of the two. project_sdpa: the project with transformers' masked sdpa
# instead of per-example attention (attention.py), untracked like project_untracked, so the two measure that lever
# alone; COMPILE_FLIPPED likewise measures compile.
SIDES = (
    ("reference", "reference", {"strong": False}, False),
    ("reference_strong", "reference", {"strong": True}, False),
    ("reference_strong_compiled", "reference", {"strong": True, "torch_compile": True}, False),
    ("project", "project", {"tracking": True}, True),
    ("project_untracked", "project", {"tracking": False}, False),
    ("project_sdpa", "project", {"tracking": False, "attention": "sdpa"}, False),
    (COMPILE_FLIPPED, "project", {"tracking": False, "compile": not COMPILE_DEFAULT}, False),
)
STRONG_SIDES = ("reference_strong", "reference_strong_compiled")


def run_worker(kind: str, spec: dict, *, work: Path, label: str, env: dict[str, str] | None = None) -> dict:
    """`python -m lora_efficiency.bench KIND SPEC OUT` in `work`; its output in work/LABEL.log, its result read
    back from work/LABEL.json. A failed worker raises with the tail of its log."""
    out, log = work / f"{label}.json", work / f"{label}.log"
    with open(log, "w") as log_file:
        proc = subprocess.run(
            [sys.executable, "-m", "lora_efficiency.bench", kind, json.dumps(spec), str(out)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env or worker_env(),
            cwd=work,  # MLflow's default ./mlruns artifacts stay in the benchmark's folder
            preexec_fn=die_with_parent,
        )
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"benchmark worker {label} failed (exit status {proc.returncode}); {log}:\n{tail}")
    return json.loads(out.read_text())


class _Runs:
    """The workers of one benchmark: all in `work` with their logs, sharing `spec`; `log` says what each did."""

    def __init__(self, work: Path, spec: dict, log: Callable[[str], object]):
        self.work, self.spec, self.log, self.t0 = work, spec, log, time.perf_counter()
        self.tracking_env = worker_env(
            MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", MLFLOW_EXPERIMENT_NAME="bench"
        )

    def elapsed(self) -> str:
        return f"[{time.perf_counter() - self.t0:6.0f} s]"

    def run(self, kind: str, label: str, tracked: bool, **extra) -> dict:
        run_spec = {**self.spec, **extra, "output_dir": str(self.work / label)}
        run = run_worker(kind, run_spec, work=self.work, label=label, env=self.tracking_env if tracked else None)
        shutil.rmtree(self.work / label, ignore_errors=True)  # the adapter: ~7 MB a run, not needed
        return run

    def repeats(self, mode: str, repeats: int) -> dict[str, list[dict]]:
        """Every side of `mode` `repeats` times, interleaved, so that a drift of the machine's speed touches all
        three alike."""
        runs: dict[str, list[dict]] = {name: [] for name, *_ in SIDES}
        for r in range(1, repeats + 1):
            for name, kind, extra, tracked in SIDES:
                label = f"{mode}-{name}-{r}"
                runs[name].append(self.run(kind, label, tracked, **extra, mode=mode))
                s = run_summary(runs[name][-1])
                self.log(
                    f"{self.elapsed()} {label}: {s['tokens_per_second']:,.0f} real tokens/s, "
                    f"{s['step_time_s']:.2f} s a step, peak {s['peak_memory_mb']:,.0f} MB"
                )
        return runs

    def profiles(self, mode: str, profile_steps: int) -> dict[str, str]:
        """torch.profiler tables of `profile_steps` steps after the warm-up, reference and project (tracked)."""
        profiles = {}
        for name, kind, extra, tracked in (
            ("reference_strong", "reference", {"strong": True}, False),
            ("project", "project", {}, True),
        ):
            label = f"{mode}-{name}-profile"
            steps = self.spec["warmup_steps"] + profile_steps
            run = self.run(kind, label, tracked, **extra, mode=mode, steps=steps, profile=True, tracking=True)
            profiles[name] = run["profile"]
            self.log(f"{self.elapsed()} {label}: {profile_steps} steps profiled")
        return profiles


def run_summary(run: dict) -> dict:
    """One run's figures: tokens/s = its measured real tokens / measured time, the median step time."""
    times, tokens = run["step_times_s"], run["step_tokens"]
    return {
        "tokens_per_second": sum(tokens) / sum(times),
        "step_time_s": statistics.median(times),
        "tokens_per_step": statistics.mean(tokens),
        "peak_memory_mb": run["peak_memory_mb"],
        "padding_fraction": run["padding_fraction"],
    }


def side_summary(runs: list[dict]) -> dict:
    """Median over repeats of each run's figures; tokens/s of a run = its measured tokens / measured time."""
    per_run = [run_summary(r) for r in runs]
    side = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
    side["tokens_per_second_range"] = [
        min(r["tokens_per_second"] for r in per_run),
        max(r["tokens_per_second"] for r in per_run),
    ]
    side["runs"] = per_run
    return side


def run_benchmark(
    *,
    modes: list[str],
    steps: int,
    warmup_steps: int,
    repeats: int,
    batch_size: int,
    seq_len: int,
    ref_batch_size: int,
    model: str,
    data: str,
    device: str,
    profile_steps: int,
    startup_launches: int,
    log=print,
) -> dict:
    """Run every measurement, each in its own process; returns the results that write_* turn into files. The
    workers' logs stay in a fresh folder under $TMPDIR (printed first) for a look at what a run did."""
    work = Path(tempfile.mkdtemp(prefix="lora-efficiency-bench-"))
    log(f"benchmark workers log to {work}")
    base = dict(model=model, data=data, device=device, batch_size=batch_size, seq_len=seq_len)
    t0 = time.perf_counter()
    setup = _setup(base, ref_batch_size, work=work, log=log)
    shared = {k: setup[k] for k in ("reference_batch_size", "reference_grad_accum")}
    facts = {k: setup[k] for k in ("example_pairs", "per_example_supported")}
    # data: the prepared folder, as a sweep passes it to its children
    spec = {**base, "data": setup["data_path"], "steps": steps, "warmup_steps": warmup_steps, **shared, **facts}
    spec["profile"] = False
    runs = _Runs(work, spec, log)
    results = {}
    for mode in modes:
        results[mode] = mode_results(runs.repeats(mode, repeats), setup)
        if profile_steps:
            results[mode]["profiles"] = runs.profiles(mode, profile_steps)
    startup = None
    if startup_launches:
        startup = measure_startup(
            model=model,
            data_path=setup["data_path"],
            mode="nf4" if "nf4" in modes else modes[0],
            batch_size=batch_size,
            seq_len=seq_len,
            device=device,
            launches=startup_launches,
            work=work,
            log=log,
        )
    return {
        "date": date.today().isoformat(),
        "machine": machine(device),
        "versions": versions(),
        "settings": {
            "model": model,
            "model_id": setup["model_id"],
            "data": data or "instruct (bundled)",
            "device": device,
            "modes": modes,
            "steps": steps,
            "warmup_steps": warmup_steps,
            "repeats": repeats,
            "profile_steps": profile_steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            **shared,
            "lora": {"rank": RANK, "alpha": ALPHA, "dropout": DROPOUT, "target_modules": TARGET_MODULES},
            "lr": LR,
            "warmup_ratio": WARMUP_RATIO,
        },
        "data": {k: setup[k] for k in ("data_name", "train_examples", "example_tokens", "examples_per_step")},
        "matmul": setup["matmul"],
        "model_matmul": setup["model_matmul"],
        "flops_per_token": setup["flops_per_token"],
        "context_tokens": setup["context_tokens"],
        "modes": results,
        "startup": startup,
        "wall_s": time.perf_counter() - t0,
    }


def _setup(base: dict, ref_batch_size: int, *, work: Path, log: Callable[[str], object]) -> dict:
    """The setup worker: matmul rates, the prepared data and the batch budget of both sides, FLOPs per token."""
    setup = run_worker("setup", {**base, "ref_batch_size": ref_batch_size}, work=work, label="setup")
    rates = setup["matmul"]
    log(
        f"matmul {rates['size']}^3: bf16 {rates['bf16_flops'] / 1e9:,.0f} GFLOP/s, fp32 "
        f"{rates['fp32_flops'] / 1e9:,.0f} GFLOP/s; {setup['examples_per_step']:.1f} examples a step: reference "
        f"{setup['reference_grad_accum']} x {setup['reference_batch_size']}, project {base['batch_size']} x "
        f"{base['seq_len']} packed"
    )
    return setup


def mode_results(runs: dict[str, list[dict]], setup: dict) -> dict:
    """One mode's figures: each side's medians; the project against the naive reference and the faster strong one
    (tokens/s, step time, peak memory); what compiling buys the strong reference and the project; the overhead of
    tracking and memory sampling (paired by repeat, with a 95% t-interval); the per-example attention lever
    (project_untracked against project_sdpa); and each side's MFU: the FLOPs it performs
    (figures.performed_flops_per_token) x its real tokens/s / the measured bf16 matmul rate."""
    sides = {name: side_summary(runs[name]) for name, *_ in SIDES}
    # the strong reference the project is held to: the faster of the two a careful user may write
    strong_name = max(STRONG_SIDES, key=lambda n: sides[n]["tokens_per_second"])
    ref, strong, proj = sides["reference"], sides[strong_name], sides["project"]
    compiled, eager = (
        (sides["project_untracked"], sides[COMPILE_FLIPPED])
        if COMPILE_DEFAULT
        else (sides[COMPILE_FLIPPED], sides["project_untracked"])
    )
    # Tracking on and off see the same batches in the same order (same seed): compare them repeat by repeat.
    overheads = [
        sum(on["step_times_s"]) / sum(off["step_times_s"]) - 1
        for on, off in zip(runs["project"], runs["project_untracked"], strict=True)
    ]
    interval = None
    if len(overheads) > 1:
        mean, sem = statistics.mean(overheads), statistics.stdev(overheads) / len(overheads) ** 0.5
        half = stats.t.ppf(0.975, len(overheads) - 1) * sem
        interval = [mean - half, mean + half]
    parts, rate = setup["flops_per_token"], setup["matmul"]["bf16_flops"]
    mfu = {}
    for name, side in sides.items():
        flops = statistics.median(performed_flops_per_token(parts, r["performed"]) for r in runs[name])
        side["performed_flops_per_token"] = flops
        mfu[name] = flops * side["tokens_per_second"] / rate
    return {
        **sides,
        "reference_gradient_checkpointing": runs["reference"][0]["gradient_checkpointing"],
        "reference_strong_gradient_checkpointing": runs["reference_strong"][0]["gradient_checkpointing"],
        "tokens_per_second_ratio": proj["tokens_per_second"] / ref["tokens_per_second"],
        "strong_reference": strong_name,
        "tokens_per_second_ratio_strong": proj["tokens_per_second"] / strong["tokens_per_second"],
        "reference_strong_compile_speedup": (
            sides["reference_strong_compiled"]["tokens_per_second"] / sides["reference_strong"]["tokens_per_second"]
        ),
        "project_compile": COMPILE_DEFAULT,
        "compile_speedup": compiled["tokens_per_second"] / eager["tokens_per_second"],
        "step_time_ratio": proj["step_time_s"] / ref["step_time_s"],
        "peak_memory_ratio": proj["peak_memory_mb"] / ref["peak_memory_mb"],
        "peak_memory_ratio_strong": proj["peak_memory_mb"] / strong["peak_memory_mb"],
        "per_example_attention_speedup": (
            sides["project_untracked"]["tokens_per_second"] / sides["project_sdpa"]["tokens_per_second"]
        ),
        "tracking_overhead": statistics.median(overheads),
        "tracking_overhead_interval": interval,
        "logging_ms_per_step": 1000 * statistics.median(r["logging_s_per_step"] for r in runs["project"]),
        "mfu": mfu["project"],
        "mfu_by_side": mfu,
        # a step that did nothing but the frozen layers' products at their shapes (figures.model_matmul_rate)
        "mfu_ceiling": setup["model_matmul"]["bf16_flops"] / rate,
    }
