"""The shared LoRA/QLoRA trainer: load, wrap with peft, a plain PyTorch loop you can read, evaluate, save."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from lora_efficiency import data as D
from lora_efficiency import distributed, progress
from lora_efficiency.cli import raise_if_terminated
from lora_efficiency.errors import UserError
from lora_efficiency.evaluation import eval_settings_tag, evaluate_model, use_exact_match
from lora_efficiency.loss import token_loss_sum
from lora_efficiency.memory import DEFAULT_INTERVAL_S, MemorySampler
from lora_efficiency.models import ModelSource, compute_dtype, load_base_model, load_tokenizer, resolve_target_modules
from lora_efficiency.planner import predict_peak_mb
from lora_efficiency.prepare import resolve_data

# peft's get_peft_model asks transformers for `is_gradient_checkpointing`, deprecated in transformers 5: one
# FutureWarning per run that says nothing about the user's settings (a sweep would print it 28 times).
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class Tracker(Protocol):
    """Where a run's numbers go: MLflow in the entry points, nowhere in NullTracker."""

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: str) -> None: ...
    def log_table(self, data: dict[str, list], artifact_file: str) -> None: ...


class NullTracker:
    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_text(self, text, artifact_file):
        pass

    def log_artifacts(self, local_dir, artifact_path):
        pass


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but torch sees no CUDA device: allowed here are 'auto' and 'cpu'")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def config_hash(settings: dict) -> str:
    """Stable hash of what determines the trained adapter; seed and device are left out so seeds group. Data and
    model enter by content (data fingerprint; base model id and revision), not by how they were named (a path,
    a run id), so the same configuration hashes the same on every machine."""
    left_out = ("seed", "device", "device_resolved", "data", "model", "checkpoint_every", "resume_from")
    keep = {k: v for k, v in settings.items() if k not in left_out}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


# A checkpoint folder holds no pickle: the adapter (peft's safetensors), optimizer state and RNG states as
# safetensors, optimizer hyper-parameters, scheduler and progress as JSON.
CHECKPOINT_STATE = "trainer_state.json"


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    peft_model,
    optimizer,
    scheduler,
    scaler,
    losses: list[float],
    config_hash: str,
    seed: int,
    tokens_total: int,
    device: torch.device,
) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(folder, safe_serialization=True)
    opt = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    save_file(tensors, str(folder / "optimizer_rng.safetensors"))
    state = {
        "step": step,
        "seed": seed,
        "config_hash": config_hash,
        "losses": losses,
        "tokens_total": tokens_total,
        "param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
    }
    (folder / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
    return folder


def load_checkpoint(
    folder: Path, *, peft_model, optimizer, scheduler, scaler, config_hash: str, seed: int, device: torch.device
) -> dict:
    """Restore adapter weights, optimizer, scheduler, scaler and RNG from `folder`; returns its trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / CHECKPOINT_STATE).read_text())
        tensors = load_file(str(folder / "optimizer_rng.safetensors"))
        adapter = load_file(str(folder / "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"resume_from={str(folder)!r} is not a readable checkpoint: {exc}") from None
    if (state.get("config_hash"), state.get("seed")) != (config_hash, seed):
        raise UserError(
            f"resume_from={str(folder)!r} was trained with other settings (config_hash {state.get('config_hash')}, "
            f"seed {state.get('seed')}; this run: {config_hash}, seed {seed}): resume with the same settings"
        )
    set_peft_model_state_dict(peft_model, adapter)
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return state


def train(
    *,
    model: ModelSource,
    data: str = "",
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    target_modules: str = "attention",
    quantization: str = "nf4",
    double_quant: bool = True,
    use_rslora: bool = False,
    use_dora: bool = False,
    max_steps: int = 100,
    batch_size: int = 4,
    grad_accum: int = 1,
    lr: float = 2e-4,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seq_len: int = 512,
    packing: bool = True,
    train_on_prompt: bool = False,
    gradient_checkpointing: bool = False,
    eval_samples: int = 300,
    eval_batch_size: int = 8,
    generate_samples: int = 100,
    max_new_tokens: int = 64,
    exact_match: str = "auto",
    seed: int = 0,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    checkpoint_every: int = 0,
    resume_from: str | Path = "",
    output_dir: str | None = None,
    checkpoint_dir: str | Path | None = None,
    tracker: Tracker | None = None,
) -> TrainResult:
    """Train one LoRA adapter on `model` and evaluate it; every number also goes to `tracker`.

    The base weights are stored as `quantization` (nf4/fp4/int8 through bitsandbytes = QLoRA, or bf16/fp16/fp32
    = LoRA); the forward runs under bf16 autocast (fp16 on GPUs without bf16) except for fp32, which stays fp32.

    Every `checkpoint_every` steps the adapter, optimizer, scheduler, RNG and step are saved in
    `checkpoint_dir/step-NNNNNN/` (a temporary folder if None) and logged as the artifact `checkpoints/step-NNNNNN`.
    `resume_from` (a checkpoint folder, made with the same settings and seed) continues from its step with the
    same batches and the same loss curve as a run that was never interrupted.

    Started by a launcher (`accelerate launch`, torchrun) as one of W processes, it trains with DDP: each process
    takes `batch_size` rows of every micro-batch of batch_size x W (global batch batch_size x grad_accum x W),
    gradients are averaged, and only rank 0 logs to `tracker`, evaluates and saves; its metrics carry tokens/s
    summed over the processes and every process's peak memory. Other ranks return a TrainResult without metrics.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    group = distributed.setup(torch.device(device))  # one process of one, unless a launcher started several
    device = group.device
    tracker = (tracker or NullTracker()) if group.is_main else NullTracker()
    if group.size > 1 and (checkpoint_every or resume_from):
        raise UserError(
            f"checkpoint_every={checkpoint_every} and resume_from={str(resume_from)!r} with {group.size} processes: "
            "checkpoints are single-process only; set checkpoint_every=0 and resume_from='' to train distributed"
        )
    settings = {
        k: v
        for k, v in locals().items()
        if k not in ("model", "device", "tracker", "output_dir", "checkpoint_dir", "group")
        and k not in ("LoraConfig", "get_peft_model", "get_scheduler")
    }
    settings["resume_from"] = str(resume_from)
    torch.manual_seed(seed)

    # -- data -------------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    prepared = resolve_data(data, model=model, tokenizer=tokenizer, seq_len=seq_len, train_on_prompt=train_on_prompt)
    train_split = prepared.train
    eval_split = D.TokenizedSplit(prepared.eval.input_ids[:eval_samples], prepared.eval.labels[:eval_samples])
    rows = D.pack(train_split, seq_len=seq_len) if packing else D.unpacked(train_split)
    eval_rows = D.unpacked(eval_split)
    if len(rows) < batch_size * group.size:
        raise UserError(
            f"batch_size={batch_size} x {group.size} process(es) is larger than the {len(rows)} training rows of "
            f"data={data!r}"
        )

    predicted_mb = predict_peak_mb(
        model.path,
        rows_target_fraction=D.target_fraction(rows, seq_len=seq_len),
        device=device,
        trust_remote_code=trust_remote_code,
        rank=rank,
        target_modules=target_modules,
        quantization=quantization,
        double_quant=double_quant,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        dropout=dropout,
    )

    # -- model ------------------------------------------------------------------------------------------
    base = load_base_model(
        model, quantization=quantization, double_quant=double_quant, device=device, trust_remote_code=trust_remote_code
    )
    modules = resolve_target_modules(base, target_modules)
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
        use_dora=use_dora,
    )
    peft_model = get_peft_model(base, lora)  # LoRA weights stay fp32 (autocast_adapter_dtype)
    trainable_params, total_params = peft_model.get_nb_trainable_parameters()
    amp_dtype = None if quantization == "fp32" else compute_dtype(device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")

    fingerprint = prepared.manifest["fingerprint"]
    resolved = {
        **settings,
        "model": model.name or model.path,
        "device_resolved": str(device),
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
        "device_name": device_name(device),
        "quantization": quantization,
    }
    tracker.log_params(
        {
            **resolved,
            "compute_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
            "global_batch_size": batch_size * grad_accum * group.size,
            "num_processes": group.size,
            "train_rows": len(rows),
            "data_path": str(prepared.path),
            "train_examples": len(train_split.input_ids),
            "eval_examples": len(eval_rows),
            "data_truncated": train_split.num_truncated,
            "data_padding_fraction": round(D.padding_fraction(rows, batch_size=batch_size), 4),
            "memory_sample_interval_s": DEFAULT_INTERVAL_S,
        }
    )
    tracker.set_tags(tags)

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    warmup_steps = round(warmup_ratio * max_steps)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    losses: list[float] = []
    first_step, tokens_total = 1, 0
    if resume_from:
        state = load_checkpoint(
            Path(resume_from),
            peft_model=peft_model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            config_hash=tags["config_hash"],
            seed=seed,
            device=device,
        )
        losses, first_step, tokens_total = list(state["losses"]), state["step"] + 1, state["tokens_total"]
        tracker.set_tags({"resumed_from_step": state["step"]})
    batches = _batches(
        rows,
        batch_size=batch_size,
        pad_id=tokenizer.pad_token_id,
        seed=seed,
        length=seq_len if packing else None,
        skip=(first_step - 1) * grad_accum,
        rank=group.rank,
        world_size=group.size,
    )
    loss_model = group.wrap(TokenLoss(peft_model))
    checkpoints = Path(checkpoint_dir) if checkpoint_dir else None  # a temporary folder at the first checkpoint

    # -- the loop ---------------------------------------------------------------------------------------
    # One optimizer step = grad_accum micro-batches of batch_size rows (4 x 512 = 2,048 tokens per micro-batch
    # by default) on each of the group.size processes. The loss is normalised by the step's target-token count
    # over every process, so accumulation is token-weighted; DDP averages gradients over the processes, so each
    # scales its sum by group.size to get the gradient one process would compute from the whole global batch.
    sampler = MemorySampler(device).start()
    time_steady, tokens_steady = 0.0, 0
    t_start = time.perf_counter()
    peft_model.train()
    bars = progress.bars_wanted() and group.is_main
    steps_bar = progress.bar(total=max_steps, desc="train", unit="step") if bars else None
    if steps_bar is not None:
        steps_bar.update(first_step - 1)
    for step in range(first_step, max_steps + 1):
        raise_if_terminated()
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(grad_accum)]
        n_targets = sum(t for _, _, t in micro)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i, (batch, _, _) in enumerate(micro):
            with group.no_sync(loss_model, last=i == grad_accum - 1):
                with autocast:
                    loss_sum, _ = loss_model({k: v.to(device) for k, v in batch.items()})
                scaler.scale(loss_sum * group.size / max(n_targets, 1)).backward()
            step_loss += loss_sum.detach().item()
        step_loss = group.sum(step_loss)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s = time.perf_counter() - t0
        real_tokens = sum(n for _, n, _ in micro)  # over every process
        tokens_total += real_tokens
        if step > first_step:  # the first step pays one-off costs (allocator warm-up, lazy init): out of the mean
            time_steady += step_s
            tokens_steady += real_tokens
        loss = step_loss / max(n_targets, 1)
        if not math.isfinite(loss):
            sampler.stop()
            raise RuntimeError(f"training diverged at step {step}: loss={loss}")
        losses.append(loss)
        if steps_bar is not None:
            steps_bar.set_postfix_str(
                f"loss {loss:.4f} | {real_tokens / step_s:.0f} tokens/s | {sampler.current_mb():.0f} MB", refresh=False
            )
            steps_bar.update(1)
        elif group.is_main and (step == 1 or step == max_steps or step % max(1, max_steps // 20) == 0):  # ~20
            print(
                f"step {step}/{max_steps} | loss {loss:.4f} | {real_tokens / step_s:.0f} tokens/s | "
                f"{step_s * 1000:.0f} ms | {sampler.current_mb():.0f} MB",
                flush=True,
            )
        tracker.log_metrics(
            {
                "train/loss": loss,
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm),
                "perf/tokens_per_second": real_tokens / step_s,
                "perf/step_time_ms": step_s * 1000,
                "memory/current_mb": sampler.current_mb(),
            },
            step=step,
        )
        if checkpoint_every and step % checkpoint_every == 0:
            checkpoints = checkpoints or Path(tempfile.mkdtemp(prefix="checkpoints-"))
            folder = save_checkpoint(
                checkpoints / f"step-{step:06d}",
                step=step,
                peft_model=peft_model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                losses=losses,
                config_hash=tags["config_hash"],
                seed=seed,
                tokens_total=tokens_total,
                device=device,
            )
            tracker.log_artifacts(str(folder), f"checkpoints/{folder.name}")
            if not checkpoint_dir:  # logged; the temporary copy is not needed
                shutil.rmtree(folder, ignore_errors=True)
    train_s = time.perf_counter() - t_start
    sampler.stop()
    if steps_bar is not None:
        steps_bar.close()
    memory = sampler.summary()  # now: the high-water mark must not include evaluation and saving
    if group.size > 1:  # memory/peak_mb: the largest of the processes (one device each); each one's as well
        per_rank = group.gather(memory)
        memory = {k: max(m[k] for m in per_rank) for k in memory}
        memory.update({f"memory/rank_{r}/peak_mb": m["memory/peak_mb"] for r, m in enumerate(per_rank)})
        torch.distributed.destroy_process_group()  # no collective after this one: rank 0 evaluates alone
    if not group.is_main:
        return TrainResult("FINISHED", losses, {}, tags, modules, "", sampler.samples)

    # -- save, then evaluate (the speed pass merges the adapter into an unquantized base, so it comes last) ---
    adapter_dir = Path(output_dir or tempfile.mkdtemp(prefix="adapter-"))
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    model_mb = base.get_memory_footprint() / 2**20
    evaluation = evaluate_model(
        peft_model,
        tokenizer,
        eval_rows=eval_rows,
        eval_examples=prepared.eval_examples[:eval_samples],
        exact_match=use_exact_match(exact_match, prepared.manifest, data),
        generate_samples=generate_samples,
        max_new_tokens=max_new_tokens,
        batch_size=eval_batch_size,
        pad_id=tokenizer.pad_token_id,
        device=device,
        autocast_dtype=amp_dtype,
        measure_merged=quantization in ("bf16", "fp16", "fp32"),
    )
    metrics = evaluation.metrics
    metrics.update(memory)
    if predicted_mb is not None:
        metrics["memory/predicted_peak_mb"] = predicted_mb  # the planner's figure, to compare with the peak
    metrics.update(
        {
            "params/trainable": float(trainable_params),
            "params/total": float(total_params),
            "params/trainable_fraction": trainable_params / total_params,
            "adapter/size_mb": sum(f.stat().st_size for f in adapter_dir.iterdir()) / 2**20,
            "memory/model_mb": model_mb,
            "time/train_s": train_s,
            "train/tokens": float(tokens_total),
            "perf/train_tokens_per_second": tokens_steady / time_steady if time_steady else tokens_total / train_s,
            "train/final_loss": losses[-1],
        }
    )
    tracker.log_metrics(metrics)
    tracker.set_tags(
        {
            "eval_settings": eval_settings_tag(
                data_fingerprint=fingerprint,
                eval_samples=eval_samples,
                generate_samples=generate_samples,
                max_new_tokens=max_new_tokens,
            )
        }
    )
    if evaluation.samples["prompt"]:
        tracker.log_table(evaluation.samples, "eval_samples.json")
    tracker.log_artifacts(str(adapter_dir), "adapter")
    tracker.log_text(sampler.trace_csv(), "memory_trace.csv")
    tracker.log_text(json.dumps(resolved, indent=2, default=str), "config.json")
    return TrainResult(
        "FINISHED", losses, metrics, tags, modules, str(adapter_dir), sampler.samples, evaluation.samples
    )
