"""The benchmark: this project's trainer against the reference a user would write (HF `Trainer` + PEFT).

make bench
python -m entrypoints.bench --modes bf16,nf4,int8 --steps 8 --warmup_steps 2 --repeats 3     # = make bench

Both sides train the same model, data, LoRA config (r=16, alpha 32, dropout 0.05 on q,k,v,o), learning-rate
schedule and number of optimizer steps. Every measurement runs in its own process (`python -m
lora_efficiency.bench WORKER SPEC OUT`, started by run_benchmark), so each peak memory belongs to one run:

- setup: bf16 and fp32 matmul rates of the device, facts about the data, model FLOPs per real token;
- reference: `Trainer` + PEFT with `DataCollatorForLanguageModeling` padding each micro-batch to its longest
  example, loaded and wrapped as the PEFT/QLoRA guides show;
- project: `lora_efficiency.trainer.train`, with MLflow tracking and memory sampling on (as every run has them),
  and again with both off, for their overhead.

Batch budget: both sides train on the same examples per optimizer step, one forward and backward per step. The
project packs them into batch_size rows of seq_len tokens (4 x 512 hold ~24 examples of the bundled set); the
reference takes as many examples as its per_device_train_batch_size, padded to their longest, so the real
(non-padding) tokens a step are about equal and the padding is the reference's own. ref_batch_size > 0 splits the
reference's step into gradient-accumulation micro-batches of that many examples instead (less memory, more time).

Real tokens: non-padding input tokens, on both sides (the reference's attention_mask sum, counted by the
Trainer's own include_num_input_tokens_seen="non_padding"; the project's packed-row lengths). A step's time is
the wall clock from one optimizer step's end to the next's, so data loading, logging and callbacks count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA, DROPOUT, TARGET_MODULES = 16, 32.0, 0.05, "attention"
LR, WARMUP_RATIO, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 2e-4, 0.1, 0.0, 1.0, 0
MODES = ("bf16", "nf4", "fp4", "int8", "fp32")
# Targets of the issue on the 2-core CPU (SmolLM2-135M, r=16, attention); a GPU table is shown without them.
TARGETS = {
    "tokens_per_second_ratio": {"bf16": 2.0, "nf4": 1.5},
    "peak_memory_ratio": 0.5,
    "tracking_overhead": 0.02,
    "startup_s": 5.0,
}
# Random-weight models of a real model's shape, for GPU tables (the weights do not change the speed).
RANDOM_SHAPES = {
    "llama-3.2-1b-shape": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Model FLOPs


def training_flops_per_token(config, *, rank: int, target_modules: str, context: float) -> dict[str, float]:
    """Model FLOPs of one LoRA training step per real token, PaLM's accounting (appendix B) adapted to LoRA.

    Full training counts 6N + 12*L*H*Q*T: 2N forward, 4N backward (activation and weight gradients). Frozen
    weights need no weight gradient, so they cost 4 a weight: forward + activation gradient. The LoRA matrices
    are trained in full (6 a weight). The output head (tied to the embedding here) is counted for every token,
    as a causal LM computes it, although the project runs it on the response tokens only: both sides are
    charged the same model FLOPs, so the MFU ratio equals the tokens/s ratio. Attention (scores and weighted
    values, no weights) costs 12*L*H*Q*T with T the context a token attends over: the token-weighted mean
    example length, since neither side attends across examples.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lora_efficiency.models import linear_module_names, resolve_target_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    linear = linear_module_names(model)
    targets = resolve_target_modules(model, target_modules)
    adapted = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
    frozen = sum(modules[n].weight.numel() for n in linear)
    lora = sum(rank * sum(modules[n].weight.shape) for n in adapted)  # A is r x in, B is out x r
    head = model.get_output_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    parts = {"frozen_linear": 4.0 * frozen, "lora": 6.0 * lora, "head": 4.0 * head, "attention": attention}
    return {**parts, "total": sum(parts.values()), "frozen_params": float(frozen), "lora_params": float(lora)}


def matmul_rates(device, *, repeats: int = 10) -> dict[str, float]:
    """Dense matmul FLOP/s in bf16 and fp32 (2048^3 on a CPU, 8192^3 on a GPU), median of `repeats`."""
    import torch

    size = 8192 if device.type == "cuda" else 2048
    rates = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        times = []
        for i in range(repeats + 3):  # 3 warm-up products: thread pool, kernel selection
            _sync(device)
            t0 = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        rates[name] = 2 * size**3 / statistics.median(times)
    return {"size": size, "bf16_flops": rates["bf16"], "fp32_flops": rates["fp32"]}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process, reads a JSON spec and writes a JSON result.


def _source(name: str):
    from lora_efficiency.models import resolve_model

    return resolve_model(str(random_model_path(name)) if name in RANDOM_SHAPES else name)


def random_model_path(name: str) -> Path:
    """A RANDOM_SHAPES model with seeded random bf16 weights and SmolLM2's tokenizer, saved once in the cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lora_efficiency.models import bundled_model_path, cache_root

    target = cache_root() / "models" / name
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    config = LlamaConfig(
        **RANDOM_SHAPES[name],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".random-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # made concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def setup_worker(spec: dict) -> dict:
    """Matmul rates first (on an idle device), then the data and the model: batch budget and FLOPs per token."""
    import torch
    from transformers import AutoConfig

    from lora_efficiency import data as D
    from lora_efficiency.models import load_tokenizer
    from lora_efficiency.prepare import resolve_data

    device = torch.device(spec["device"])
    rates = matmul_rates(device)
    source = _source(spec["model"])
    tokenizer = load_tokenizer(source)
    prepared = resolve_data(spec["data"], model=source, tokenizer=tokenizer, seq_len=spec["seq_len"])
    lengths = [len(x) for x in prepared.train.input_ids]
    rows = D.pack(prepared.train, seq_len=spec["seq_len"])
    examples_per_step = spec["batch_size"] * len(lengths) / len(rows)
    micro = max(1, round(examples_per_step))  # the reference's micro-batch: the step's examples, or fewer
    micro = min(spec["ref_batch_size"], micro) if spec["ref_batch_size"] else micro
    context = sum(n * n for n in lengths) / sum(lengths)
    flops = training_flops_per_token(
        AutoConfig.from_pretrained(source.path), rank=RANK, target_modules=TARGET_MODULES, context=context
    )
    return {
        "matmul": rates,
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
        "flops_per_token": flops,
    }


def _profiler(device):
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def _profile_table(prof, device, rows: int = 15) -> str:
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


class StepWindow:
    """Step-end timestamps of one run, and the torch profiler over steps first+1 .. last when asked."""

    def __init__(self, device, *, profile_from: int = 0, profile_to: int = 0):
        self.device, self.profile_from, self.profile_to = device, profile_from, profile_to
        self.stamps: list[float] = []
        self.prof = None
        self.profile = ""

    def step_end(self, step: int) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        if self.profile_to and step == self.profile_from:
            self.prof = _profiler(self.device)
            self.prof.start()
        elif self.prof is not None and step == self.profile_to:
            self.prof.stop()
            self.profile = _profile_table(self.prof, self.device)
            self.prof = None

    def measured(self, warmup_steps: int) -> list[float]:
        """Durations of steps warmup_steps+1 .. last (each from the previous step's end)."""
        return [b - a for a, b in zip(self.stamps[warmup_steps - 1 : -1], self.stamps[warmup_steps:], strict=True)]


def reference_worker(spec: dict) -> dict:
    """HF Trainer + PEFT as a user writes it, on the same tokenized examples as the project."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from lora_efficiency.memory import MemorySampler
    from lora_efficiency.models import compute_dtype, load_tokenizer, resolve_target_modules
    from lora_efficiency.prepare import resolve_data

    hf_logging.set_verbosity_error()
    device, mode = torch.device(spec["device"]), spec["mode"]
    source = _source(spec["model"])
    tokenizer = load_tokenizer(source)  # pad = eos where the tokenizer has no pad token, as users do
    prepared = resolve_data(spec["data"], model=source, tokenizer=tokenizer, seq_len=spec["seq_len"])
    # The project's tokenization (chat template, truncated to seq_len): the same tokens on both sides.
    dataset = Dataset.from_dict({"input_ids": prepared.train.input_ids})

    dtype = compute_dtype(device)
    kwargs: dict = {"dtype": dtype if mode != "fp32" else torch.float32}
    if mode in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    elif mode == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if "quantization_config" in kwargs:
        # The QLoRA recipe of the PEFT docs. With its defaults it upcasts the non-quantized weights (embedding,
        # norms) to fp32 and turns on gradient checkpointing: less activation memory, a slower backward.
        model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=resolve_target_modules(model, TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    collator = _CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    window = StepWindow(
        device,
        profile_from=spec["warmup_steps"] if spec["profile"] else 0,
        profile_to=spec["steps"] if spec["profile"] else 0,
    )
    tokens_seen: list[int] = []

    class Clock(TrainerCallback):
        sampler = None

        def on_train_begin(self, args, state, control, **kw):
            self.sampler = MemorySampler(device).start()

        def on_step_end(self, args, state, control, **kw):
            window.step_end(state.global_step)
            tokens_seen.append(int(state.num_input_tokens_seen))

        def on_train_end(self, args, state, control, **kw):
            self.sampler.stop()

    clock = Clock()
    args = TrainingArguments(
        output_dir=spec["output_dir"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["reference_batch_size"],
        gradient_accumulation_steps=spec["reference_grad_accum"],
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP_RATIO,  # a float < 1 is a ratio of max_steps
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        bf16=mode != "fp32" and dtype == torch.bfloat16,
        fp16=mode != "fp32" and dtype == torch.float16,
        use_cpu=device.type == "cpu",
        seed=SEED,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock])
    trainer.train()
    warm = spec["warmup_steps"]
    return {
        "step_times_s": window.measured(warm),
        "step_tokens": [b - a for a, b in zip(tokens_seen[warm - 1 : -1], tokens_seen[warm:], strict=True)],
        "peak_memory_mb": clock.sampler.summary()["memory/peak_mb"],
        "padding_fraction": 1 - collator.real / max(collator.positions, 1),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "profile": window.profile,
    }


class _CountingCollator:
    """Counts the positions and real tokens of every batch it pads, for the padding fraction."""

    def __init__(self, inner):
        self.inner, self.positions, self.real = inner, 0, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.positions += batch["attention_mask"].numel()
        self.real += int(batch["attention_mask"].sum())
        return batch


class ClockTracker:
    """Wraps the tracker train() logs to: the trainer logs each step's metrics right after the step, so that
    call's arrival is the step's end; the call itself is timed too (what logging costs the loop directly)."""

    def __init__(self, inner, window: StepWindow):
        self.inner, self.window = inner, window
        self.step_metrics: list[dict] = []
        self.log_s: list[float] = []

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if step is None:
            self.inner.log_metrics(metrics)
            return
        self.window.step_end(step)
        self.step_metrics.append(dict(metrics))
        t0 = time.perf_counter()
        self.inner.log_metrics(metrics, step=step)
        self.log_s.append(time.perf_counter() - t0)

    def __getattr__(self, name):  # log_params, set_tags, log_text, log_artifacts, log_table
        return getattr(self.inner, name)


def project_worker(spec: dict) -> dict:
    """lora_efficiency.trainer.train, tracking on (an MLflow run in the store MLFLOW_TRACKING_URI names) or off."""
    import functools

    import torch

    from lora_efficiency import trainer as trainer_module
    from lora_efficiency.memory import MemorySampler

    device = torch.device(spec["device"])
    window = StepWindow(
        device,
        profile_from=spec["warmup_steps"] if spec["profile"] else 0,
        profile_to=spec["steps"] if spec["profile"] else 0,
    )
    settings = dict(
        model=_source(spec["model"]),
        data=spec["data"],
        rank=RANK,
        alpha=ALPHA,
        dropout=DROPOUT,
        target_modules=TARGET_MODULES,
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
    if spec["tracking"]:
        from lora_efficiency.tracking import start_run

        with start_run(run_name=f"bench-{spec['mode']}", entry_point="bench") as tracker:
            clock = ClockTracker(tracker, window)
            result = trainer_module.train(tracker=clock, **settings)
    else:
        # The trainer always samples memory. Off: the sampler takes its first and last sample only (its thread
        # never wakes up during the run); the peak is still the kernel's exact high-water mark (VmHWM).
        trainer_module.MemorySampler = functools.partial(MemorySampler, interval_s=1e6)
        clock = ClockTracker(trainer_module.NullTracker(), window)
        result = trainer_module.train(tracker=clock, **settings)
    warm = spec["warmup_steps"]
    measured = clock.step_metrics[warm:]
    tokens = [round(m["perf/tokens_per_second"] * m["perf/step_time_ms"] / 1000) for m in measured]
    positions = spec["batch_size"] * spec["seq_len"] * len(measured)
    return {
        "step_times_s": window.measured(warm),
        "step_tokens": tokens,
        "peak_memory_mb": result.metrics["memory/peak_mb"],
        "padding_fraction": 1 - sum(tokens) / positions,
        "logging_s_per_step": statistics.median(clock.log_s[warm:]),
        "profile": window.profile,
    }


WORKERS = {"setup": setup_worker, "reference": reference_worker, "project": project_worker}


# ---------------------------------------------------------------------------------------------------------
# Orchestration: one worker process per measurement


def _die_with_parent() -> None:
    """preexec_fn: a worker gets SIGKILL when the benchmark dies, so none outlives it (as in sweep.py)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _env(**extra: str) -> dict[str, str]:
    from lora_efficiency.progress import PROGRESS_ENV

    env = {**os.environ, PROGRESS_ENV: "lines", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _run_worker(kind: str, spec: dict, *, work: Path, label: str, env: dict[str, str] | None = None) -> dict:
    out, log = work / f"{label}.json", work / f"{label}.log"
    with open(log, "w") as log_file:
        proc = subprocess.run(
            [sys.executable, "-m", "lora_efficiency.bench", kind, json.dumps(spec), str(out)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env or _env(),
            cwd=work,  # MLflow's default ./mlruns artifacts stay in the benchmark's folder
            preexec_fn=_die_with_parent,
        )
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"benchmark worker {label} failed (exit status {proc.returncode}); {log}:\n{tail}")
    return json.loads(out.read_text())


def _run_summary(run: dict) -> dict:
    times, tokens = run["step_times_s"], run["step_tokens"]
    return {
        "tokens_per_second": sum(tokens) / sum(times),
        "step_time_s": statistics.median(times),
        "tokens_per_step": statistics.mean(tokens),
        "peak_memory_mb": run["peak_memory_mb"],
        "padding_fraction": run["padding_fraction"],
    }


def _side(runs: list[dict]) -> dict:
    """Median over repeats of each run's figures; tokens/s of a run = its measured tokens / measured time."""
    per_run = [_run_summary(r) for r in runs]
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
    setup = _run_worker("setup", {**base, "ref_batch_size": ref_batch_size}, work=work, label="setup")
    rates = setup["matmul"]
    log(
        f"matmul {rates['size']}^3: bf16 {rates['bf16_flops'] / 1e9:,.0f} GFLOP/s, fp32 "
        f"{rates['fp32_flops'] / 1e9:,.0f} GFLOP/s; {setup['examples_per_step']:.1f} examples a step: reference "
        f"{setup['reference_grad_accum']} x {setup['reference_batch_size']}, project {batch_size} x {seq_len} packed"
    )
    spec = {
        **base,
        "data": setup["data_path"],  # the prepared folder, as a sweep passes it to its children
        "steps": steps,
        "warmup_steps": warmup_steps,
        "reference_batch_size": setup["reference_batch_size"],
        "reference_grad_accum": setup["reference_grad_accum"],
        "profile": False,
    }
    tracking_env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db", MLFLOW_EXPERIMENT_NAME="bench")
    results = {}
    for mode in modes:
        runs: dict[str, list[dict]] = {"reference": [], "project": [], "project_untracked": []}
        for r in range(1, repeats + 1):
            # interleaved, so that a drift of the machine's speed touches all three alike
            for name, kind, extra, env in (
                ("reference", "reference", {}, None),
                ("project", "project", {"tracking": True}, tracking_env),
                ("project_untracked", "project", {"tracking": False}, None),
            ):
                label = f"{mode}-{name}-{r}"
                run_spec = {**spec, **extra, "mode": mode, "output_dir": str(work / label)}
                run = _run_worker(kind, run_spec, work=work, label=label, env=env)
                shutil.rmtree(work / label, ignore_errors=True)  # the adapter: ~7 MB a run, not needed
                runs[name].append(run)
                s = _run_summary(run)
                log(
                    f"[{time.perf_counter() - t0:6.0f} s] {label}: {s['tokens_per_second']:,.0f} real tokens/s, "
                    f"{s['step_time_s']:.2f} s a step, peak {s['peak_memory_mb']:,.0f} MB"
                )
        results[mode] = _mode_results(runs, setup)
        if profile_steps:
            profiles = {}
            for name, kind, env in (("reference", "reference", None), ("project", "project", tracking_env)):
                label = f"{mode}-{name}-profile"
                run_spec = {
                    **spec,
                    "mode": mode,
                    "steps": warmup_steps + profile_steps,
                    "profile": True,
                    "tracking": True,
                    "output_dir": str(work / label),
                }
                profiles[name] = _run_worker(kind, run_spec, work=work, label=label, env=env)["profile"]
                log(f"[{time.perf_counter() - t0:6.0f} s] {label}: {profile_steps} steps profiled")
            results[mode]["profiles"] = profiles
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
            "reference_batch_size": setup["reference_batch_size"],
            "reference_grad_accum": setup["reference_grad_accum"],
            "lora": {"rank": RANK, "alpha": ALPHA, "dropout": DROPOUT, "target_modules": TARGET_MODULES},
            "lr": LR,
            "warmup_ratio": WARMUP_RATIO,
        },
        "data": {k: setup[k] for k in ("data_name", "train_examples", "example_tokens", "examples_per_step")},
        "matmul": rates,
        "flops_per_token": setup["flops_per_token"],
        "context_tokens": setup["context_tokens"],
        "modes": results,
        "startup": startup,
        "wall_s": time.perf_counter() - t0,
    }


def _mode_results(runs: dict[str, list[dict]], setup: dict) -> dict:
    ref, proj, untracked = _side(runs["reference"]), _side(runs["project"]), _side(runs["project_untracked"])
    # Tracking on and off see the same batches in the same order (same seed): compare them repeat by repeat.
    overheads = [
        sum(on["step_times_s"]) / sum(off["step_times_s"]) - 1
        for on, off in zip(runs["project"], runs["project_untracked"], strict=True)
    ]
    flops = setup["flops_per_token"]["total"]
    rates = setup["matmul"]
    return {
        "reference": ref,
        "project": proj,
        "project_untracked": untracked,
        "reference_gradient_checkpointing": runs["reference"][0]["gradient_checkpointing"],
        "tokens_per_second_ratio": proj["tokens_per_second"] / ref["tokens_per_second"],
        "step_time_ratio": proj["step_time_s"] / ref["step_time_s"],
        "peak_memory_ratio": proj["peak_memory_mb"] / ref["peak_memory_mb"],
        "tracking_overhead": statistics.median(overheads),
        "logging_ms_per_step": 1000 * statistics.median(r["logging_s_per_step"] for r in runs["project"]),
        "mfu": flops * proj["tokens_per_second"] / rates["bf16_flops"],
        "mfu_fp32": flops * proj["tokens_per_second"] / rates["fp32_flops"],
        "reference_mfu": flops * ref["tokens_per_second"] / rates["bf16_flops"],
        "reference_mfu_fp32": flops * ref["tokens_per_second"] / rates["fp32_flops"],
    }


# ---------------------------------------------------------------------------------------------------------
# Second run of a sweep: start to first step

_STEP_LINE = re.compile(r"^step 1/\d+ .*\| (\d+) ms \|")


def measure_startup(
    *,
    model: str,
    data_path: str,
    mode: str,
    batch_size: int,
    seq_len: int,
    device: str,
    launches: int,
    work: Path,
    log=print,
) -> dict:
    """Launch `python -m entrypoints.train` exactly as a sweep launches a child (its command, an MLflow run made
    for it, the prepared data folder) `launches` times, and time each from launch to the start of its first
    step: the arrival of the "step 1/N" line minus the step's own time, which that line gives. The first launch
    may meet cold caches; the later ones are the "second run of a sweep". One more launch with
    `python -X importtime` says how much of it is imports."""
    import mlflow

    from lora_efficiency.config import TrainConfig, build_config, read_defaults
    from lora_efficiency.sweep import _train_command

    uri = f"sqlite:///{work}/startup.db"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("bench-startup", artifact_location=str(work / "startup-artifacts"))
    overrides = dict(
        model=str(random_model_path(model)) if model in RANDOM_SHAPES else model,
        quantization=mode,
        max_steps=1,
        batch_size=batch_size,
        seq_len=seq_len,
        eval_samples=1,
        generate_samples=0,
        max_new_tokens=1,
        device=device,
    )
    command = _train_command(build_config(TrainConfig, {**read_defaults("train"), **overrides}), data_path)
    launched = []
    for i in range(launches + 1):
        importtime = i == launches
        if importtime and launches < 2:
            break
        run_id = client.create_run(experiment_id, run_name=f"startup-{i}").info.run_id
        env = _env(
            MLFLOW_TRACKING_URI=uri,
            MLFLOW_RUN_ID=run_id,
            MLFLOW_EXPERIMENT_ID=experiment_id,
            MLFLOW_LOGGING_LEVEL="WARNING",
        )
        cmd = [command[0], "-X", "importtime", *command[1:]] if importtime else command
        err = work / f"startup-{i}.stderr"
        with open(err, "w") as err_file:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err_file,
                text=True,
                cwd=ROOT,
                env=env,
                preexec_fn=_die_with_parent,
            )
            first = None
            for line in proc.stdout:
                if first is None and (match := _STEP_LINE.match(line)):
                    first = time.perf_counter() - t0 - int(match.group(1)) / 1000
            proc.wait()
        if proc.returncode != 0 or first is None:
            tail = "\n".join(err.read_text(errors="replace").splitlines()[-25:])
            raise RuntimeError(f"startup launch {i} failed (exit status {proc.returncode}):\n{tail}")
        if importtime:
            imports = import_times(err.read_text(errors="replace"))
            log(f"startup with -X importtime: {first:.1f} s, of which imports {imports['total_s']:.1f} s")
            return {"launches_s": launched, "second_run_s": statistics.median(launched[1:]), "imports": imports}
        launched.append(first)
        log(f"startup launch {i + 1}: {first:.1f} s from launch to the first step")
    return {"launches_s": launched, "second_run_s": statistics.median(launched[1:]) if launches > 1 else None}


def import_times(stderr: str, top: int = 8) -> dict:
    """Seconds spent importing, from `python -X importtime` output: in all, and by top-level package (each
    module's own time goes to its package, so torch's time is torch's whoever imported it), largest first."""
    total, by_package = 0.0, {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        if not self_us.strip().isdigit():  # the header line
            continue
        if not name.startswith("  "):  # imported by running code, not by another import: its cumulative time counts
            total += int(cumulative_us) / 1e6
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(self_us) / 1e6
    ranked = sorted(by_package.items(), key=lambda kv: -kv[1])
    return {"total_s": total, "packages_s": dict(ranked[:top])}


# ---------------------------------------------------------------------------------------------------------
# Where and with what it ran


def machine(device: str) -> dict:
    import platform

    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
        flags = next(ln for ln in info.splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    out = {
        "cpu": cpu + (", AVX512-BF16" if "avx512_bf16" in flags else ""),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30),
    }
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def versions() -> dict:
    import importlib.metadata
    import platform

    names = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "mlflow")
    return {"python": platform.python_version(), **{n: importlib.metadata.version(n) for n in names}}


# ---------------------------------------------------------------------------------------------------------
# Reports: bench-results.json and a block of docs/benchmarks.md


def write_json(results: dict, path: str | Path, command: str) -> None:
    Path(path).write_text(json.dumps({"command": command, **results}, indent=2) + "\n")


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _verdict(value: float, target: float | None, higher_is_better: bool) -> str:
    if target is None:
        return ""
    met = value >= target if higher_is_better else value <= target
    return f" ({'met' if met else 'short'}: {'>=' if higher_is_better else '<='} {target:g})"


def _steps(s: dict) -> str:
    first, last = s["warmup_steps"] + 1, s["warmup_steps"] + s["profile_steps"]
    return f"step {first}" if first == last else f"steps {first}-{last}"


def render_markdown(results: dict, command: str) -> str:
    """One block of docs/benchmarks.md: the run's header, a summary against the targets, a table per mode."""
    s, m, r = results["settings"], results["machine"], results["matmul"]
    cpu = s["device"] == "cpu"
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    flops = results["flops_per_token"]
    v = results["versions"]
    lines = [
        f"## {s['model_id']} on {'the CPU' if cpu else 'a GPU'} ({where}), {results['date']}",
        "",
        f"`{command}` ({results['wall_s'] / 60:.0f} min). "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + f"; {m['torch_threads']} torch threads, {m['memory_gb']} GB RAM.",
        "",
        f"LoRA r={s['lora']['rank']}, alpha {s['lora']['alpha']:g}, dropout {s['lora']['dropout']:g} on "
        f"q,k,v,o; lr {s['lr']:g}, cosine, {s['warmup_ratio']:.0%} warm-up; {s['steps']} optimizer steps of which "
        f"the first {s['warmup_steps']} are left out, {s['repeats']} repeats, medians. Data: "
        f"{results['data']['data_name']} ({results['data']['train_examples']:,} examples of "
        f"{results['data']['example_tokens']['min']}-{results['data']['example_tokens']['max']} tokens). Batch: "
        f"~{results['data']['examples_per_step']:.0f} examples a step on both sides: the project packs them into "
        f"{s['batch_size']} rows of {s['seq_len']} tokens, the reference "
        + (
            f"pads them to their longest (per_device_train_batch_size {s['reference_batch_size']})."
            if s["reference_grad_accum"] == 1
            else f"takes {s['reference_grad_accum']} micro-batches of {s['reference_batch_size']} examples padded "
            "to their longest (gradient accumulation)."
        ),
        "",
        f"Matmul rate measured first ({r['size']}^3, median of 10): bf16 {r['bf16_flops'] / 1e9:,.0f} GFLOP/s, fp32 "
        f"{r['fp32_flops'] / 1e9:,.0f} GFLOP/s. Model FLOPs per real token {flops['total'] / 1e6:,.0f} M = "
        f"4 x {flops['frozen_params'] / 1e6:.1f} M frozen linear weights + 6 x {flops['lora_params'] / 1e6:.2f} M "
        f"LoRA weights + 4 x the head ({flops['head'] / 4e6:.1f} M) + attention 12 L H Q T at T = "
        f"{results['context_tokens']:.0f} tokens ({flops['attention'] / 1e6:.0f} M); MFU = that x real tokens/s / "
        "the measured matmul rate.",
        "",
        "| base | real tokens/s, project / reference | peak memory, project / reference | "
        "tracking + sampling overhead | MFU (bf16 rate), project / reference |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, x in results["modes"].items():
        tps_target = TARGETS["tokens_per_second_ratio"].get(mode) if cpu else None
        mem_target = TARGETS["peak_memory_ratio"] if cpu else None
        overhead_target = TARGETS["tracking_overhead"] if cpu else None
        lines.append(
            f"| {mode} | {x['tokens_per_second_ratio']:.2f}{_verdict(x['tokens_per_second_ratio'], tps_target, True)} "
            f"| {x['peak_memory_ratio']:.2f}{_verdict(x['peak_memory_ratio'], mem_target, False)} "
            f"| {x['tracking_overhead']:+.1%}{_verdict(x['tracking_overhead'], overhead_target, False)} "
            f"| {_pct(x['mfu'])} / {_pct(x['reference_mfu'])} |"
        )
    startup = results.get("startup")
    if startup and startup.get("second_run_s") is not None:
        target = TARGETS["startup_s"] if cpu else None
        launches = ", ".join(f"{t:.1f}" for t in startup["launches_s"])
        lines += [
            "",
            f"Second run of a sweep, launch to first step: **{startup['second_run_s']:.1f} s**"
            f"{_verdict(startup['second_run_s'], target, False)} (`python -m entrypoints.train` as the sweep "
            f"launches it, caches warm; launches: {launches} s).",
        ]
        if "imports" in startup:
            packages = ", ".join(f"{k} {t:.1f}" for k, t in startup["imports"]["packages_s"].items())
            lines.append(
                f"Imports take {startup['imports']['total_s']:.1f} s of it (`-X importtime`, by package: {packages} s)."
            )
    for mode, x in results["modes"].items():
        ref, proj, off = x["reference"], x["project"], x["project_untracked"]
        gc = (
            ", gradient checkpointing on (prepare_model_for_kbit_training)"
            if x["reference_gradient_checkpointing"]
            else ""
        )
        lines += [
            "",
            f"### {mode} base",
            "",
            f"| | reference: HF Trainer + PEFT{gc} | this project | project / reference |",
            "| --- | --- | --- | --- |",
            f"| real tokens/s (range over repeats) | {ref['tokens_per_second']:,.0f} "
            f"({ref['tokens_per_second_range'][0]:,.0f}-{ref['tokens_per_second_range'][1]:,.0f}) | "
            f"{proj['tokens_per_second']:,.0f} ({proj['tokens_per_second_range'][0]:,.0f}-"
            f"{proj['tokens_per_second_range'][1]:,.0f}) | {x['tokens_per_second_ratio']:.2f} |",
            f"| step time, s | {ref['step_time_s']:.3f} | {proj['step_time_s']:.3f} | {x['step_time_ratio']:.2f} |",
            f"| real tokens a step | {ref['tokens_per_step']:,.0f} | {proj['tokens_per_step']:,.0f} | |",
            f"| padding, share of positions | {_pct(ref['padding_fraction'])} | {_pct(proj['padding_fraction'])} | |",
            f"| peak memory, MB | {ref['peak_memory_mb']:,.0f} | {proj['peak_memory_mb']:,.0f} | "
            f"{x['peak_memory_ratio']:.2f} |",
            f"| MFU at the bf16 / fp32 matmul rate | {_pct(x['reference_mfu'])} / {_pct(x['reference_mfu_fp32'])} | "
            f"{_pct(x['mfu'])} / {_pct(x['mfu_fp32'])} | |",
            "",
            f"Tracking and memory sampling: {proj['step_time_s']:.3f} s a step with them, {off['step_time_s']:.3f} s "
            f"without ({x['tracking_overhead']:+.1%}, repeat by repeat on the same batches); the logging call itself "
            f"takes {x['logging_ms_per_step']:.2f} ms a step, the rest runs in MLflow's and the sampler's threads.",
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
    return "\n".join(lines) + "\n"


HEADER = """# Benchmarks

The project's trainer against the reference a user would write (Hugging Face `Trainer` + PEFT,
`DataCollatorForLanguageModeling` padding each batch to its longest example), written by `make bench`
(`lora_efficiency/bench.py` says what is measured and how). Each block below is replaced when the benchmark
runs again on the same kind of device and model; text outside the blocks is kept.
"""


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
    s = results["settings"]
    return f"{'cpu' if s['device'] == 'cpu' else 'cuda'}-{re.sub(r'[^A-Za-z0-9.-]', '_', Path(s['model']).name)}"


if __name__ == "__main__":
    kind, spec_json, out_path = sys.argv[1:4]
    result = WORKERS[kind](json.loads(spec_json))
    Path(out_path).write_text(json.dumps(result))
