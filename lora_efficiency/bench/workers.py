"""The benchmark's measurements that run in a process of their own (`python -m lora_efficiency.bench KIND SPEC
OUT`, started by orchestration.run_worker), so that each peak memory belongs to one run: `setup` (matmul rates,
the data, FLOPs per token) and `project` (this project's trainer, tracking on or off). The reference side is
reference.py's; a worker reads a JSON spec and returns a JSON-able dict."""

from __future__ import annotations

import functools
import statistics
import time

import torch
from transformers import AutoConfig

from lora_efficiency import attention
from lora_efficiency import data as D
from lora_efficiency.bench.figures import matmul_rates, model_matmul_rate, sync, training_flops_per_token
from lora_efficiency.bench.recipe import (
    ALPHA,
    DROPOUT,
    LR,
    MAX_GRAD_NORM,
    RANK,
    SEED,
    TARGET_MODULES,
    WARMUP_RATIO,
    WEIGHT_DECAY,
    model_source,
)
from lora_efficiency.memory import MemorySampler
from lora_efficiency.models import load_tokenizer
from lora_efficiency.prepare import resolve_data
from lora_efficiency.progress import PROGRESS_ENV
from lora_efficiency.subprocesses import child_env


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of the benchmark's child processes: the project on PYTHONPATH (subprocesses.child_env),
    progress as plain lines rather than bars (they go to a log file) and unbuffered output, so a failed child's
    log ends where it stopped; plus `extra`."""
    return child_env(**{PROGRESS_ENV: "lines", "PYTHONUNBUFFERED": "1"}, **extra)


def prepared_data(spec: dict):
    """(model source, tokenizer, prepared data) of a spec: the same tokens on every side of the benchmark."""
    source = model_source(spec["model"])
    tokenizer = load_tokenizer(source)  # pad = eos where the tokenizer has no pad token, as users do
    prepared = resolve_data(spec["data"], model=source, tokenizer=tokenizer, seq_len=spec["seq_len"])
    return source, tokenizer, prepared


def setup_worker(spec: dict) -> dict:
    """Matmul rates first (on an idle device), then the data and the model: batch budget, FLOPs per token and the
    rate of the model's own products at the project's step shape (the MFU's ceiling)."""
    device = torch.device(spec["device"])
    rates = matmul_rates(device)
    source, _, prepared = prepared_data(spec)
    lengths = [len(x) for x in prepared.train.input_ids]
    rows = D.pack(prepared.train, seq_len=spec["seq_len"])
    examples_per_step = spec["batch_size"] * len(lengths) / len(rows)
    micro = max(1, round(examples_per_step))  # the reference's micro-batch: the step's examples, or fewer
    micro = min(spec["ref_batch_size"], micro) if spec["ref_batch_size"] else micro
    context = sum(n * n for n in lengths) / sum(lengths)
    # Per-example attention's query-key pairs per real token: each example's, and the padding tail's, squared
    # (a padded row's tail restarts its positions at 0: it is one more "example").
    pairs = sum(
        sum(n * n for n in attention.example_lengths(torch.tensor([p + list(range(spec["seq_len"] - len(p)))]))[0])
        for p in rows.position_ids
    )
    model_config = AutoConfig.from_pretrained(source.path)
    flops = training_flops_per_token(model_config, rank=RANK, target_modules=TARGET_MODULES, context=context)
    return {
        "matmul": rates,
        "model_matmul": model_matmul_rate(model_config, spec["batch_size"] * spec["seq_len"], device),
        "model_id": source.model_id,
        "model_path": source.path,
        "data_path": str(prepared.path),
        "data_name": prepared.manifest["dataset"],
        "train_examples": len(lengths),
        "example_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
        "packed_rows": len(rows),
        "examples_per_step": examples_per_step,
        "reference_batch_size": micro,
        "reference_grad_accum": max(1, round(examples_per_step / micro)),
        "context_tokens": context,
        "example_pairs": pairs / sum(lengths),
        "per_example_supported": attention.supports_per_example(model_config),
        "flops_per_token": flops,
    }


class StepWindow:
    """Step-end timestamps of one run, and the torch profiler over steps first+1 .. last when asked."""

    def __init__(self, device, *, profile_from: int = 0, profile_to: int = 0):
        self.device, self.profile_from, self.profile_to = device, profile_from, profile_to
        self.stamps: list[float] = []
        self.prof = None
        self.profile = ""

    @classmethod
    def for_spec(cls, device, spec: dict) -> StepWindow:
        """A worker's window: the profiler over the steps after the warm-up when the spec asks for a profile."""
        profile = spec["profile"]
        return cls(
            device, profile_from=spec["warmup_steps"] if profile else 0, profile_to=spec["steps"] if profile else 0
        )

    def step_end(self, step: int) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        if self.profile_to and step == self.profile_from:
            self.prof = _profiler(self.device)
            self.prof.start()
        elif self.prof is not None and step == self.profile_to:
            self.prof.stop()
            key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            self.profile = self.prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)
            self.prof = None

    def measured(self, warmup_steps: int) -> list[float]:
        """Durations of steps warmup_steps+1 .. last (each from the previous step's end)."""
        return [b - a for a, b in zip(self.stamps[warmup_steps - 1 : -1], self.stamps[warmup_steps:], strict=True)]


def _profiler(device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


class ClockTracker:
    """Wraps the tracker train() logs to and times each step's log_metrics call: what logging costs the loop
    directly (the rest of tracking's cost runs in MLflow's and the sampler's threads; on vs off measures it)."""

    def __init__(self, inner):
        self.inner = inner
        self.log_s: list[float] = []

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if step is None:
            self.inner.log_metrics(metrics)
            return
        t0 = time.perf_counter()
        self.inner.log_metrics(metrics, step=step)
        self.log_s.append(time.perf_counter() - t0)

    def __getattr__(self, name):  # log_params, set_tags, log_text, log_artifacts, log_table
        return getattr(self.inner, name)


def project_worker(spec: dict) -> dict:
    """lora_efficiency.trainer.train, tracking on (an MLflow run in the store MLFLOW_TRACKING_URI names) or off.
    A step callback stamps each step's end (right after the trainer times it) and keeps its real tokens."""
    # lazy: the reference worker imports this module too, and the trainer's imports would add to its measured RSS
    from lora_efficiency.trainer import NullTracker, StepStats, train

    device = torch.device(spec["device"])
    window = StepWindow.for_spec(device, spec)
    steps: list[StepStats] = []

    def on_step(stats: StepStats) -> None:
        window.step_end(stats.step)
        steps.append(stats)

    run = functools.partial(train, callbacks=[on_step], **_project_settings(spec, device))
    if spec["tracking"]:
        from lora_efficiency.tracking import start_run  # lazy: as the trainer above (MLflow's import)

        with start_run(run_name=f"bench-{spec['mode']}", entry_point="bench") as tracker:
            clock = ClockTracker(tracker)
            result = run(tracker=clock)
    else:
        # The trainer always samples memory. Off: the sampler takes its first and last sample only (its thread
        # never wakes up during the run); the peak is still the kernel's exact high-water mark (VmHWM).
        clock = ClockTracker(NullTracker())
        result = run(tracker=clock, memory_sampler=functools.partial(MemorySampler, interval_s=1e6))
    warm = spec["warmup_steps"]
    tokens = [s.tokens for s in steps[warm:]]
    padding = 1 - sum(tokens) / (spec["batch_size"] * spec["seq_len"] * len(tokens))
    return {
        "step_times_s": window.measured(warm),
        "step_tokens": tokens,
        "peak_memory_mb": result.metrics["memory/peak_mb"],
        "padding_fraction": padding,
        "performed": _project_performed(spec, steps[warm:], padding),
        "logging_s_per_step": statistics.median(clock.log_s[warm:]),
        "profile": window.profile,
    }


def _project_performed(spec: dict, steps: list, padding: float) -> dict[str, float]:
    """What the project computes per real token (figures.performed_flops_per_token): every position of its packed
    rows; the head on the loss targets only, recomputed in backward (loss.py checkpoints it: 6 FLOPs a weight);
    attention over each example (per-example attention: the data's pairs per token, spec["example_pairs"]) or
    over each whole row (transformers' sdpa with a block mask: seq_len pairs a position)."""
    real = sum(s.tokens for s in steps)
    positions = 1 / (1 - padding)
    per_example = spec["per_example_supported"] and spec.get("attention", "auto") != "sdpa"
    return {
        "positions_per_token": positions,
        "head_positions_per_token": sum(s.targets for s in steps) / real,
        "head_factor": 6,
        "attention_pairs_per_token": spec["example_pairs"] if per_example else positions * spec["seq_len"],
        "gradient_checkpointing": False,
    }


def _project_settings(spec: dict, device) -> dict:
    """train()'s keywords: the benchmark's recipe on the spec's model, data, mode and batch."""
    return dict(
        model=model_source(spec["model"]),
        data=spec["data"],
        rank=RANK,
        alpha=ALPHA,
        dropout=DROPOUT,
        target_modules=TARGET_MODULES,
        attention=spec.get("attention", "auto"),
        **({"compile": spec["compile"]} if "compile" in spec else {}),
        quantization=spec["mode"],
        max_steps=spec["steps"],
        batch_size=spec["batch_size"],
        seq_len=spec["seq_len"],
        lr=LR,
        warmup_ratio=WARMUP_RATIO,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        seed=SEED,
        eval_samples=1,  # evaluation comes after the measured loop; keep it short
        generate_samples=0,
        max_new_tokens=1,
        device=device,
        output_dir=spec["output_dir"],
    )
