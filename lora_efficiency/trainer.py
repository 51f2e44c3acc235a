"""The shared LoRA/QLoRA trainer, in the order it runs: settings in, setup (data, model, optimizer), the loop,
finish (save, evaluate, log).

    from lora_efficiency.models import resolve_model
    from lora_efficiency.trainer import train
    result = train(model=resolve_model("smollm2-135m"), rank=8, max_steps=20)   # any TrainConfig field

What is not the loop comes in as hooks: the tracker (MLflow in the entry points, NullTracker otherwise), the
memory sampler, and callbacks called with each step's StepStats (the progress display and checkpoints are two).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch
from peft import LoraConfig, get_peft_model
from transformers import get_scheduler

from lora_efficiency import data as D
from lora_efficiency import distributed, progress
from lora_efficiency.adapters import command_line, save_adapter, write_model_card
from lora_efficiency.checkpoints import Checkpointer, load_checkpoint
from lora_efficiency.cli import raise_if_terminated
from lora_efficiency.config import SETTINGS_FILE, TrainConfig, build_config, read_defaults, settings_text
from lora_efficiency.configuration import RESOLVED, config_hash, planner_inputs
from lora_efficiency.devices import device_name, resolve_device
from lora_efficiency.errors import UserError
from lora_efficiency.evaluation import (
    PER_EXAMPLE_LOSSES,
    Scoring,
    cached_scores,
    evaluate_loss,
    forgetting_metrics,
    forgetting_rows,
)
from lora_efficiency.loss import token_loss_sum
from lora_efficiency.memory import DEFAULT_INTERVAL_S, MemorySampler
from lora_efficiency.models import (
    ModelSource,
    check_packing,
    compile_layers,
    compute_dtype,
    keep_adapter_inputs_in_compute_dtype,
    load_base_model,
    load_tokenizer,
    max_positions,
    provenance,
    resolve_target_modules,
)
from lora_efficiency.names import PYTHON_DOCS
from lora_efficiency.planner import predict_peak_mb
from lora_efficiency.prepare import Prepared, resolve_data
from lora_efficiency.validation import Validator

__all__ = ["NullTracker", "StepStats", "TrainResult", "Tracker", "config_hash", "train"]

# peft's get_peft_model asks transformers for `is_gradient_checkpointing`, deprecated in transformers 5: one
# FutureWarning per run that says nothing about the user's settings (a sweep would print it 28 times).
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class Tracker(Protocol):
    """Where a run's numbers go: MLflow in the entry points (tracking.MlflowTracker), nowhere in NullTracker."""

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str) -> None: ...
    def log_table(self, data: dict[str, list], artifact_file: str) -> None: ...
    def log_data_inputs(self, manifest: dict, prepared_path: str) -> None: ...


class NullTracker:
    """A Tracker that keeps nothing (ranks other than 0, Python callers that do not track)."""

    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        pass

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        pass

    def log_data_inputs(self, manifest: dict, prepared_path: str) -> None:
        pass


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, as the callbacks see it (right after the step, before its metrics are logged)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # real (non-padding) tokens of the step, over every process
    targets: int  # loss-target tokens of the step, over every process
    step_s: float
    memory_mb: float  # the memory sampler's current reading


Callback = Callable[[StepStats], None]


@dataclass
class TrainResult:
    status: str
    losses: list[float]
    metrics: dict[str, float]
    tags: dict[str, str]
    target_modules: list[str]
    adapter_dir: str
    memory_trace: list[tuple[float, float]] = field(default_factory=list)
    eval_samples: dict[str, list] = field(default_factory=dict)


@dataclass
class Forgetting:
    """The forgetting set (general text, not the task) and its scores before the first step: the base alone."""

    rows: D.Rows
    before: dict[str, float]
    elapsed_s: float
    scoring: dict[str, Any]  # evaluate_loss's settings, the same before and after (the same batches)
    cached: bool = False  # `before` read from the cache of base scores, not scored by this run


def score_forgetting(
    cfg: TrainConfig, tokenizer, prepared: Prepared, model, device, amp_dtype, source: ModelSource
) -> Forgetting | None:
    """forget_samples passages of the Python reference scored by `model` before it trains (LoRA's B starts at zero,
    full fine-tuning has not moved: the base alone, in the run's own storage and kernels); None when off, or when the
    run trains on that very text (data=python-docs), where it measures the task, not forgetting.

    That score is the base's, not the run's: it is cached on disk (evaluation.cached_scores) under everything it
    depends on, so the seeds and settings of a sweep that share a base pay it once (16 x 256 tokens, nf4: ~19 s of
    a ~210 s quick run on a shared 2-core CPU at 1 thread, docs/benchmarks.md)."""
    if not cfg.forget_samples or prepared.manifest.get("dataset") == PYTHON_DOCS:
        return None
    t0 = time.perf_counter()
    rows = forgetting_rows(tokenizer, samples=cfg.forget_samples, seq_len=cfg.seq_len)
    # Batches no larger than a training micro-batch (rows of up to seq_len tokens): the heap a CPU process grows
    # for a larger shape stays in its RSS, and the training run's peak would count it (8 x 512 rows scored before
    # the first step raised a 2 x 512 run's memory/peak_mb by 181 MB, 20% over the planner's prediction).
    batch_size = min(cfg.eval_batch_size, cfg.batch_size)
    scoring = dict(batch_size=batch_size, pad_id=tokenizer.pad_token_id, device=device, autocast_dtype=amp_dtype)
    key = {
        "model": source.path,
        "model_id": source.model_id,
        "revision": source.revision,
        # what the weights are stored and computed in; DoRA's initial magnitude makes its start differ from the base
        **{k: getattr(cfg, k) for k in ("method", "quantization", "double_quant", "use_dora", "attention")},
        "attention_implementation": model.config._attn_implementation,
        "rows": hashlib.sha256(json.dumps([rows.input_ids, rows.labels]).encode()).hexdigest(),
        "batch_size": batch_size,
        "pad_id": tokenizer.pad_token_id,
        "device": device_name(device),
        "autocast_dtype": str(amp_dtype),
    }
    before, cached = cached_scores("forgetting-base", key, lambda: evaluate_loss(model, rows, **scoring))
    return Forgetting(rows, before, time.perf_counter() - t0, scoring, cached)


@dataclass
class Session:
    """What setup() builds: everything the loop and finish() use."""

    cfg: TrainConfig
    group: distributed.Group
    source: ModelSource
    tokenizer: Any
    prepared: Prepared
    rows: D.Rows
    eval_rows: D.Rows
    val_rows: D.Rows  # the validation curve's examples (the end of the held-out split)
    base: torch.nn.Module
    peft_model: torch.nn.Module  # what trains: peft's LoRA model, or the base itself for method=full
    loss_model: torch.nn.Module  # TokenLoss(peft_model), under DDP or FSDP when there are several processes
    modules: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    resolved: dict[str, Any]
    tags: dict[str, str]
    predicted_mb: float | None
    trainable_params: int  # counted right after get_peft_model, before anything (evaluation, merging) can move them
    total_params: int
    first_step: int = 1
    validator: Validator | None = None  # the validation curve, when eval_every > 0 (rank 0 only)
    forgetting: Forgetting | None = None  # general text scored before the first step (rank 0, forget_samples > 0)
    losses: list[float] = field(default_factory=list)
    tokens_total: int = 0  # real tokens trained on, over every process, resumed steps included
    setup_s: float = 0.0  # setup()'s seconds, the base's forgetting score left out (it is in time/forgetting_s)

    @property
    def device(self) -> torch.device:
        return self.group.device

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def eval_kwargs(self) -> dict[str, Any]:
        """evaluation.evaluate_loss's settings for this run."""
        return {
            "batch_size": self.cfg.eval_batch_size,
            "pad_id": self.tokenizer.pad_token_id,
            "device": self.device,
            "autocast_dtype": self.amp_dtype,
        }

    def compiled(self):
        """Where the compiled layers run compiled (train() keeps them eager elsewhere): the training step."""
        return torch.compiler.set_stance("default") if self.cfg.compile else contextlib.nullcontext()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()


@dataclass
class LoopStats:
    """What the loop measured, for finish()."""

    train_s: float
    steady_s: float  # steps after the first (which pays allocator warm-up and lazy initialisation)
    steady_tokens: int
    startup_s: float  # process start -> first training step
    first_step_s: float  # the first step: one-off costs, compile=true's compilation (or its cache load) included
    memory: dict[str, float]  # the sampler's summary, taken before evaluation
    memory_trace: list[tuple[float, float]]
    memory_trace_csv: str
    memory_source: str = "rss"  # MemorySampler.source: where the memory figures come from


def train(
    config: TrainConfig | None = None,
    *,
    model: ModelSource,
    tracker: Tracker | None = None,
    callbacks: Sequence[Callback] = (),
    memory_sampler: Callable[[torch.device], MemorySampler] | None = None,
    output_dir: str | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_dir: str | Path | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train one LoRA adapter on `model`, evaluate it, and send every number to `tracker`.

    Settings: `config` (a TrainConfig), or configs/default.yaml's, with `overrides` (TrainConfig field names)
    on top; either way checked before anything loads. The base weights are stored as `quantization`
    (nf4/fp4/int8 through bitsandbytes = QLoRA, or bf16/fp16/fp32 = LoRA); the forward runs under bf16 autocast
    (fp16 on GPUs without bf16) except for fp32.

    Every `checkpoint_every` steps the adapter, optimizer, scheduler, RNG and step are saved in
    `checkpoint_dir/step-NNNNNN/` (a temporary folder if None) and logged as the artifact `checkpoints/step-NNNNNN`;
    `resume_from` (a checkpoint folder of the same settings and seed, or a train run's id whose latest checkpoint
    `resume_dir` holds: entrypoints.train downloads it) continues with the same batches and loss curve.

    Started by a launcher (`accelerate launch`, torchrun) as one of W processes, it trains with DDP (or FSDP2 with
    sharding=fsdp: each process holds 1/W of the base and adapter): each process takes `batch_size` rows of every
    micro-batch of batch_size x W, gradients are averaged, and only rank 0 logs, evaluates and saves; other ranks
    return a TrainResult without metrics.
    """
    cfg = train_settings(config, model=model, **overrides)
    group = distributed.setup(resolve_device(cfg.device), cfg.sharding)  # one of one, unless launched as several
    tracker = (tracker or NullTracker()) if group.is_main else NullTracker()
    torch.manual_seed(cfg.seed)
    # compile=true compiles the decoder layers for the training step alone (fit lifts this stance around it):
    # scoring forgetting, validation, evaluation and generation run other shapes (and a KV cache) that would
    # each compile again, for a few forward passes.
    with torch.compiler.set_stance("force_eager"):
        return _train(cfg, group, model, tracker, callbacks, memory_sampler, output_dir, checkpoint_dir, resume_dir)


def _train(
    cfg, group, model, tracker, callbacks, memory_sampler, output_dir, checkpoint_dir, resume_dir
) -> TrainResult:
    t0 = time.perf_counter()
    session = setup(cfg, model=model, group=group, tracker=tracker)
    session.setup_s = time.perf_counter() - t0 - (session.forgetting.elapsed_s if session.forgetting else 0.0)
    if cfg.resume_from:  # the settings keep the run id (settings.yaml reruns it), not where it was downloaded
        resume(session, Path(resume_dir or cfg.resume_from), tracker)
    hooks = [*callbacks, progress_callback(cfg.max_steps, session.first_step, show=group.is_main)]
    if cfg.eval_every and group.is_main:
        session.validator = Validator(
            session.peft_model,
            session.val_rows,
            every=cfg.eval_every,
            max_steps=cfg.max_steps,
            tol=cfg.converge_tol,
            tracker=tracker,
            eval_kwargs=session.eval_kwargs(),
        )
        hooks.insert(0, session.validator)  # first: the step's other hooks (checkpoints) see the model as trained
    if cfg.checkpoint_every:
        hooks.append(Checkpointer(session, every=cfg.checkpoint_every, folder=checkpoint_dir, tracker=tracker))
    loop = fit(session, tracker=tracker, callbacks=hooks, sampler=(memory_sampler or MemorySampler)(group.device))
    for hook in hooks:
        getattr(hook, "close", lambda: None)()
    if group.sharding == "fsdp":
        unshard(session)
    group.close()
    if not group.is_main:
        return TrainResult("FINISHED", session.losses, {}, session.tags, session.modules, "", loop.memory_trace)
    return finish(session, loop, tracker=tracker, output_dir=output_dir)


def train_settings(config: TrainConfig | None = None, *, model: ModelSource, **overrides: Any) -> TrainConfig:
    """The run's TrainConfig: `config` or the defaults file's train section, with `overrides`, checked (one
    ConfigError naming every bad field). The model field records how `model` was named."""
    values = config.flat() if config else read_defaults("train")
    values.update({k: (str(v) if isinstance(v, torch.device | Path) else v) for k, v in overrides.items()})
    values["model"] = model.name or model.path
    return build_config(TrainConfig, values)


# -- setup: data, model, optimizer ----------------------------------------------------------------------------


def check_fits_model(cfg: TrainConfig, rows: D.Rows, model: ModelSource) -> None:
    """Refuse, before any step, data with no target token left (every response truncated away at seq_len) and a
    seq_len beyond the model's positions (a learned position table, GPT-2's 1,024, fails with IndexError)."""
    if not any(label != D.IGNORE_INDEX for row in rows.labels for label in row):
        raise UserError(
            f"seq_len={cfg.seq_len} leaves no target token in the {len(rows)} training rows of data={cfg.data!r}: "
            "every response is cut off after its prompt; raise seq_len or use shorter prompts"
        )
    limit = max_positions(model.path, trust_remote_code=cfg.trust_remote_code)
    if limit and cfg.seq_len > limit:
        raise UserError(f"seq_len={cfg.seq_len} is invalid for model={cfg.model!r}: at most its {limit} positions")


def setup(cfg: TrainConfig, *, model: ModelSource, group: distributed.Group, tracker: Tracker) -> Session:
    """Load data and model, log what the run is (params, tags), build the optimizer, resume if asked."""
    if cfg.packing:
        check_packing(model, trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(model, trust_remote_code=cfg.trust_remote_code)
    prepared = resolve_data(
        cfg.data, model=model, tokenizer=tokenizer, seq_len=cfg.seq_len, train_on_prompt=cfg.train_on_prompt
    )
    rows = D.pack(prepared.train, seq_len=cfg.seq_len) if cfg.packing else D.unpacked(prepared.train)
    held_out = prepared.eval
    eval_rows = D.unpacked(
        D.TokenizedSplit(held_out.input_ids[: cfg.eval_samples], held_out.labels[: cfg.eval_samples])
    )
    # the validation curve scores the END of the held-out split: disjoint from the final evaluation's first
    # eval_samples when both fit (100 + 200 in the 300 of the bundled set), so choices made on it (the LR) are
    # not scored on the examples that report them
    val_rows = D.unpacked(D.TokenizedSplit(held_out.input_ids[-cfg.val_samples :], held_out.labels[-cfg.val_samples :]))
    check_fits_model(cfg, rows, model)
    if len(rows) < cfg.batch_size * group.size:
        raise UserError(
            f"batch_size={cfg.batch_size} x {group.size} process(es) is larger than the {len(rows)} training rows "
            f"of data={cfg.data!r}"
        )
    predicted_mb = None  # the planner models LoRA and QLoRA, not full fine-tuning
    if cfg.method == "lora":
        predicted_mb = predict_peak_mb(
            model.path,
            rows_target_fraction=D.target_fraction(rows, seq_len=cfg.seq_len),
            device=group.device,
            trust_remote_code=cfg.trust_remote_code,
            **planner_inputs(cfg.flat()),
        )
    base, trained, modules, amp_dtype = build_model(cfg, model, group.device)
    # before DDP or FSDP wrap it (FSDP shards it in place) and before a checkpoint resumes it: the base alone
    forgetting = group.is_main and score_forgetting(cfg, tokenizer, prepared, trained, group.device, amp_dtype, model)
    if cfg.method == "lora":  # peft's count: a 4-bit weight's packed storage counted as its parameters
        trainable_params, total_params = trained.get_nb_trainable_parameters()
    else:  # every weight trains
        trainable_params = total_params = sum(p.numel() for p in trained.parameters())
    loss_model = group.wrap(TokenLoss(trained))  # before the optimizer: FSDP swaps each parameter for its shard
    optimizer, scheduler = make_optimizer(
        [p for p in trained.parameters() if p.requires_grad],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        max_steps=cfg.max_steps,
    )
    resolved, tags = describe_run(cfg, model=model, prepared=prepared, modules=modules, group=group)
    session = Session(
        cfg=cfg,
        group=group,
        source=model,
        tokenizer=tokenizer,
        prepared=prepared,
        rows=rows,
        eval_rows=eval_rows,
        val_rows=val_rows,
        base=base,
        peft_model=trained,
        loss_model=loss_model,
        modules=modules,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(
            group.device.type, enabled=amp_dtype == torch.float16 and group.device.type == "cuda"
        ),
        amp_dtype=amp_dtype,
        resolved=resolved,
        tags=tags,
        predicted_mb=predicted_mb,
        trainable_params=trainable_params,
        total_params=total_params,
        forgetting=forgetting or None,
    )
    log_run_description(session, tracker)
    return session


def build_model(
    cfg: TrainConfig, model: ModelSource, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module, list[str], torch.dtype | None]:
    """(base, the model that trains, the adapted module names, the autocast dtype or None).

    method=lora: the base frozen in `quantization` storage, peft's LoRA on `target_modules` (the LoRA weights stay
    fp32: peft's autocast_adapter_dtype). method=full: every weight trains, kept in fp32 (master weights: AdamW
    updates of ~lr x 1e-3 vanish when rounded to bf16's 8 bits of mantissa) with the forward under bf16 autocast
    for quantization=bf16/fp16, as HF Trainer's bf16=True does; quantization=fp32 trains in fp32 throughout."""
    full = cfg.method == "full"
    base = load_base_model(
        model,
        quantization="fp32" if full else cfg.quantization,
        double_quant=cfg.double_quant,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        attention=cfg.attention,
        shardable=cfg.sharding == "fsdp",
    )
    modules = ["*"] if full else resolve_target_modules(base, cfg.target_modules)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    amp_dtype = None if cfg.quantization == "fp32" else compute_dtype(device)
    if full:
        if cfg.compile:
            compile_layers(base)
        return base, base.requires_grad_(True), modules, amp_dtype
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=modules,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )
    trained = get_peft_model(base, lora)
    if amp_dtype is not None:  # every forward of the session runs under autocast (Session.autocast, the scoring)
        keep_adapter_inputs_in_compute_dtype(trained)
    if cfg.compile:
        compile_layers(base)
    return base, trained, modules, amp_dtype


def make_optimizer(
    params: list[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_ratio: float, max_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with a linear warm-up over warmup_ratio x max_steps, then cosine decay to 0 at max_steps."""
    # fused: one kernel for every parameter's update; on the CPU, 0.08 s a step for 133 M fp32 weights against
    # 0.27 s for the default foreach implementation (1 thread, 2026-12-02): it matters for method=full. It needs
    # floating-point parameters on the CPU or a GPU, which the trainable ones always are here.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    warmup_steps = round(warmup_ratio * max_steps)
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


def describe_run(
    cfg: TrainConfig, *, model: ModelSource, prepared: Prepared, modules: list[str], group: distributed.Group
) -> tuple[dict[str, Any], dict[str, str]]:
    """The run's resolved settings (logged as params, hashed into config_hash) and its identifying tags."""
    settings = {k: v for k, v in cfg.flat().items() if k not in ("device", "num_processes")}
    fingerprint = prepared.manifest["fingerprint"]
    resolved = {
        **settings,
        "device_resolved": str(group.device),
        "target_modules_resolved": ",".join(modules),
        "base_model": model.model_id,
        "base_model_revision": model.revision,
        "data_name": prepared.manifest["dataset"],
        "data_fingerprint": fingerprint,
    }
    if group.size > 1:  # only then: the config_hash of every single-process run stays what it was
        resolved["world_size"] = group.size
    tags = {
        "config_hash": config_hash(resolved),
        "base_model": model.model_id,
        "base_model_revision": model.revision,
        "data_fingerprint": fingerprint,
        "device_name": device_name(group.device),
        "quantization": cfg.quantization,
        "method": cfg.method,
        **provenance(model, trust_remote_code=cfg.trust_remote_code),
    }
    return resolved, tags


def log_run_description(s: Session, tracker: Tracker) -> None:
    cfg = s.cfg
    tracker.log_params(
        {
            **s.resolved,
            "device": cfg.device,  # as given (auto); device_resolved: what it became
            "compute_dtype": str(s.amp_dtype).removeprefix("torch.") if s.amp_dtype else "float32",
            "attention_implementation": s.base.config._attn_implementation,
            "global_batch_size": cfg.batch_size * cfg.grad_accum * s.group.size,
            "num_processes": s.group.size,
            "train_rows": len(s.rows),
            "data_path": str(s.prepared.path),
            "train_examples": len(s.prepared.train.input_ids),
            "eval_examples": len(s.eval_rows),
            "data_truncated": s.prepared.train.num_truncated,
            "data_padding_fraction": round(D.padding_fraction(s.rows, batch_size=cfg.batch_size), 4),
            "memory_sample_interval_s": DEFAULT_INTERVAL_S,
        }
    )
    tracker.set_tags(s.tags)
    tracker.log_data_inputs(s.prepared.manifest, str(s.prepared.path))
    found = {k: s.resolved[k] for k in (*RESOLVED, "world_size") if k in s.resolved}
    note = "The settings of one train run (`resolved`: what its model and data were; a record, not read back)"
    tracker.log_text(settings_text(cfg, {**found, "config_hash": s.tags["config_hash"]}, note), SETTINGS_FILE)


def resume(s: Session, folder: Path, tracker: Tracker) -> None:
    state = load_checkpoint(
        folder,
        peft_model=s.peft_model,
        optimizer=s.optimizer,
        scheduler=s.scheduler,
        scaler=s.scaler,
        config_hash=s.tags["config_hash"],
        seed=s.cfg.seed,
        device=s.device,
    )
    s.losses, s.first_step, s.tokens_total = list(state["losses"]), state["step"] + 1, state["tokens_total"]
    tracker.set_tags({"resumed_from_step": state["step"]})


# -- the loop -------------------------------------------------------------------------------------------------


def fit(s: Session, *, tracker: Tracker, callbacks: Sequence[Callback], sampler: MemorySampler) -> LoopStats:
    """The training loop. One optimizer step = grad_accum micro-batches of batch_size rows (4 x 512 = 2,048
    tokens a micro-batch by default) on each of the group.size processes. The loss is normalised by the step's
    target-token count over every process, so accumulation is token-weighted; DDP averages gradients over the
    processes, so each scales its sum by group.size to get the gradient of the whole global batch."""
    cfg, group, device = s.cfg, s.group, s.device
    batches = _batches(
        s.rows,
        batch_size=cfg.batch_size,
        pad_id=s.tokenizer.pad_token_id,
        seed=cfg.seed,
        length=cfg.seq_len if cfg.packing else None,
        skip=(s.first_step - 1) * cfg.grad_accum,
        rank=group.rank,
        world_size=group.size,
    )
    loss_model, trainable = s.loss_model, s.trainable
    steady_s, steady_tokens, first_step_s = 0.0, 0, 0.0
    sampler.start()
    t_start = time.perf_counter()
    startup_s = time.time() - psutil.Process().create_time()
    s.peft_model.train()
    for step in range(s.first_step, cfg.max_steps + 1):
        raise_if_terminated()
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        n_targets = sum(t for _, _, t in micro)
        s.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i, (batch, _, _) in enumerate(micro):
            with group.no_sync(loss_model, last=i == cfg.grad_accum - 1), s.compiled():
                with s.autocast():
                    loss_sum, _ = loss_model({k: v.to(device) for k, v in batch.items()})
                s.scaler.scale(loss_sum * group.size / max(n_targets, 1)).backward()
            step_loss += loss_sum.detach().item()
        s.scaler.unscale_(s.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s = time.perf_counter() - t0
        tokens = sum(n for _, n, _ in micro)  # over every process
        loss = group.sum(step_loss) / max(n_targets, 1)
        if not math.isfinite(loss):
            sampler.stop()
            raise RuntimeError(f"training diverged at step {step}: loss={loss}")
        s.losses.append(loss)
        s.tokens_total += tokens
        if step > s.first_step:  # the first step pays one-off costs (allocator warm-up, lazy init): out of the mean
            steady_s, steady_tokens = steady_s + step_s, steady_tokens + tokens
        else:
            first_step_s = step_s
        stats = StepStats(
            step, loss, s.scheduler.get_last_lr()[0], float(grad_norm), tokens, n_targets, step_s, sampler.current_mb()
        )
        for callback in callbacks:
            callback(stats)
        tracker.log_metrics(step_metrics(stats), step=step)
    train_s = time.perf_counter() - t_start
    sampler.stop()
    memory = sampler.summary()  # now: the high-water mark must not include evaluation and saving
    memory_trace = (sampler.samples, sampler.trace_csv(), sampler.source)
    memory = gather_memory(memory, group, s.peft_model)
    return LoopStats(train_s, steady_s, steady_tokens, startup_s, first_step_s, memory, *memory_trace)


def step_metrics(stats: StepStats) -> dict[str, float]:
    return {
        "train/loss": stats.loss,
        "train/lr": stats.lr,
        "train/grad_norm": stats.grad_norm,
        "perf/tokens_per_second": stats.tokens / stats.step_s,
        "perf/step_time_ms": stats.step_s * 1000,
        "memory/current_mb": stats.memory_mb,
    }


def gather_memory(memory: dict[str, float], group: distributed.Group, model: torch.nn.Module) -> dict[str, float]:
    """memory/peak_mb over W processes: the largest (one device each), and each one's as memory/rank_N/peak_mb;
    memory/rank_N/params_mb: the weights that process holds (all of them under DDP, 1/W of each under FSDP)."""
    if group.size == 1:
        return memory
    params_mb = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters()) / 2**20
    per_rank = group.gather({**memory, "params_mb": params_mb})
    memory = {k: max(m.get(k, 0.0) for m in per_rank) for k in set().union(*per_rank) - {"params_mb"}}
    for r, m in enumerate(per_rank):  # keys differ by source
        memory.update({f"memory/rank_{r}/peak_mb": m["memory/peak_mb"], f"memory/rank_{r}/params_mb": m["params_mb"]})
    return memory


def unshard(s: Session) -> None:
    """After an FSDP training: every rank hands in its shard of the trained (adapter) weights, and rank 0 loads
    them into a fresh unsharded model, which finish() saves (adapter only) and evaluates alone. The frozen base
    is read again from its folder, not gathered: training never changed it."""
    adapter = s.group.full_trainable_state(s.peft_model)
    if not s.group.is_main:
        return
    with torch.random.fork_rng(devices=[]):  # peft's initialisation of the new LoRA weights draws no seed of ours
        s.base, s.peft_model, _, _ = build_model(s.cfg, s.source, s.device)
    loaded = s.peft_model.load_state_dict(adapter, strict=False)
    if loaded.unexpected_keys or set(adapter) != {n for n, p in s.peft_model.named_parameters() if p.requires_grad}:
        raise RuntimeError(f"FSDP: the gathered adapter does not fit the model ({loaded.unexpected_keys[:3]})")
    s.loss_model = TokenLoss(s.peft_model)


def progress_callback(max_steps: int, first_step: int, *, show: bool) -> Callback:
    """A step bar on a terminal (tqdm), else ~20 plain `step N/M | loss | tokens/s | ms | MB` lines a run."""
    if not show:
        return lambda stats: None
    if progress.bars_wanted():
        bar = progress.bar(total=max_steps, desc="train", unit="step")
        bar.update(first_step - 1)

        def update(stats: StepStats) -> None:
            bar.set_postfix_str(
                f"loss {stats.loss:.4f} | {stats.tokens / stats.step_s:.0f} tokens/s | {stats.memory_mb:.0f} MB",
                refresh=False,
            )
            bar.update(1)

        update.close = bar.close
        return update

    def line(stats: StepStats) -> None:
        if stats.step in (1, max_steps) or stats.step % max(1, max_steps // 20) == 0:
            print(
                f"step {stats.step}/{max_steps} | loss {stats.loss:.4f} | {stats.tokens / stats.step_s:.0f} tokens/s"
                f" | {stats.step_s * 1000:.0f} ms | {stats.memory_mb:.0f} MB",
                flush=True,
            )

    return line


# -- finish: save, evaluate, log ------------------------------------------------------------------------------


def finish(s: Session, loop: LoopStats, *, tracker: Tracker, output_dir: str | None) -> TrainResult:
    """Save the adapter, then evaluate (the speed pass merges the adapter into an unquantized base, so it comes
    last), then log every summary number and the artifacts."""
    cfg, t_finish = s.cfg, time.perf_counter()
    # named `adapter` wherever it lands (run artifacts, the MLflow model's artifacts, a user's download)
    adapter_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="run-")) / "adapter"
    # a full fine-tuning run's "adapter" is the whole model (540 MB in fp32 for SmolLM2-135M): written only
    # where the caller asks (output_dir), never logged; the study keeps it as a reference, not as a deliverable
    if cfg.method == "lora":  # the base by its hub id, the tokenizer and chat template beside it
        save_adapter(s.peft_model, s.tokenizer, adapter_dir, source=s.source)
    elif output_dir:
        s.peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    model_mb = s.base.get_memory_footprint() / 2**20
    saving_s = time.perf_counter() - t_finish
    forgetting = score_forgetting_after(s, tracker)  # before evaluate_model, which may merge the adapter into the base
    t0 = time.perf_counter()
    scoring = Scoring.of(
        s.prepared,
        data=cfg.data,
        exact_match=cfg.exact_match,
        eval_samples=cfg.eval_samples,
        generate_samples=cfg.generate_samples,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.eval_batch_size,
    )
    evaluation = scoring.run(
        s.peft_model,
        s.tokenizer,
        device=s.device,
        autocast_dtype=s.amp_dtype,
        measure_merged=cfg.quantization in ("bf16", "fp16", "fp32"),
        eval_rows=s.eval_rows,
        pack_length=cfg.seq_len if cfg.packing else 0,  # packed like training, where the model allows packing
    )
    metrics = {**evaluation.metrics, **forgetting, **loop.memory, **summary_metrics(s, loop, adapter_dir, model_mb)}
    metrics["time/evaluation_s"] = time.perf_counter() - t0  # held-out loss, exact match, generation speed
    if s.validator:
        converged = s.validator.result()
        metrics.update({**converged.metrics(), "time/validation_s": s.validator.elapsed_s})
        tracker.set_tags({"converged": converged.status})
    t_logging = time.perf_counter()
    tracker.log_metrics(metrics)
    tracker.set_tags({"eval_settings": scoring.tag, "memory_source": loop.memory_source})
    if evaluation.samples["prompt"]:
        tracker.log_table(evaluation.samples, "eval_samples.json")
    tracker.log_table(evaluation.per_example, PER_EXAMPLE_LOSSES)
    if cfg.method == "lora":
        write_model_card(
            adapter_dir,
            settings=s.resolved,
            metrics=metrics,
            data={k: s.prepared.manifest.get(k, "") for k in ("dataset", "origin", "fingerprint")},
            command=command_line(),
            run_id=getattr(tracker, "run_id", None),
        )
        tracker.log_artifacts(str(adapter_dir), "adapter")
    tracker.log_text(loop.memory_trace_csv, "memory_trace.csv")
    tracker.log_text(json.dumps(s.resolved, indent=2, default=str), "config.json")
    # saving the adapter, then logging the metrics, tables and artifacts (the MLflow model is the entry point's)
    metrics["time/logging_s"] = saving_s + time.perf_counter() - t_logging
    tracker.log_metrics({"time/logging_s": metrics["time/logging_s"]})
    return TrainResult(
        "FINISHED", s.losses, metrics, s.tags, s.modules, str(adapter_dir), loop.memory_trace, evaluation.samples
    )


def score_forgetting_after(s: Session, tracker: Tracker) -> dict[str, float]:
    """The forget/* metrics: the forgetting set scored by the trained model against the base's score."""
    if not s.forgetting:
        return {}
    t0 = time.perf_counter()
    after = evaluate_loss(s.peft_model, s.forgetting.rows, **s.forgetting.scoring)
    tracker.set_tags({"forget_base_cached": str(s.forgetting.cached).lower()})
    # before (0 when read from the cache) + after
    return {
        **forgetting_metrics(after, s.forgetting.before),
        "time/forgetting_s": s.forgetting.elapsed_s + time.perf_counter() - t0,
    }


def summary_metrics(s: Session, loop: LoopStats, adapter_dir: Path, model_mb: float) -> dict[str, float]:
    trainable_params, total_params = s.trainable_params, s.total_params
    metrics = {
        "params/trainable": float(trainable_params),
        "params/total": float(total_params),
        "params/trainable_fraction": trainable_params / total_params,
        "memory/model_mb": model_mb,
        "time/train_s": loop.train_s - (s.validator.elapsed_s if s.validator else 0.0),  # training alone
        "time/startup_s": loop.startup_s,
        "time/setup_s": s.setup_s,  # data, model, optimizer, params: the run's share of time/startup_s
        "time/first_step_s": loop.first_step_s,
        "train/tokens": float(s.tokens_total),
        "perf/train_tokens_per_second": (
            loop.steady_tokens / loop.steady_s if loop.steady_s else s.tokens_total / loop.train_s
        ),
        "train/final_loss": s.losses[-1],
    }
    if s.cfg.method == "lora":
        # the adapter's own files: the tokenizer saved beside it (3.4 MB for SmolLM2) is no cost of the adapter
        metrics["adapter/size_mb"] = sum(f.stat().st_size for f in adapter_dir.glob("adapter_*")) / 2**20
    if s.predicted_mb is not None:
        metrics["memory/predicted_peak_mb"] = s.predicted_mb  # the planner's figure, to compare with the peak
    return metrics


# -- helpers --------------------------------------------------------------------------------------------------


def _batches(
    rows: D.Rows,
    *,
    batch_size: int,
    pad_id: int,
    seed: int,
    length: int | None,
    skip: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[dict, int, int]]:
    """Endless shuffled micro-batches, reshuffled every epoch from the seed; yields (this rank's tensors, real
    tokens and target tokens of the whole micro-batch over every rank). Rank r gets rows r x batch_size ..
    (r + 1) x batch_size of a micro-batch of batch_size x world_size rows, padded to one length: W processes of
    batch_size train on exactly the rows (and shapes) one process of batch_size x W would. The first `skip`
    micro-batches are passed over without being built: a resumed run continues the same order."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    size = batch_size * world_size
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):  # train() checks len(rows) >= batch_size x world_size
            if skip:
                skip -= 1
                continue
            idx = order[start : start + size]
            batch = D.collate(rows, idx, pad_id=pad_id, length=length)
            targets = int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())
            mine = {k: v[rank * batch_size : (rank + 1) * batch_size] for k, v in batch.items()}
            yield mine, sum(len(rows.input_ids[i]) for i in idx), targets


class TokenLoss(torch.nn.Module):
    """token_loss_sum as a module: under DDP the whole loss runs inside DDP's forward, which readies the gradient
    reducer for the backward that follows (the loss calls the decoder directly, not the model's forward)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return token_loss_sum(self.model, batch)
