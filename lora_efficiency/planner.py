"""The memory planner: a run's peak training memory, predicted from the model's config before anything loads."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import psutil
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from lora_efficiency.loss import LOSS_CHUNK_TOKENS
from lora_efficiency.memory import MB
from lora_efficiency.models import linear_module_names, resolve_target_modules

# The memory planner: the peak a run will reach, predicted from the model's config before anything loads.
# Every constant below was measured on this stack (torch 2.13 CPU, transformers 5.23, peft 0.21.2,
# bitsandbytes 0.50.2, glibc malloc); tests/integration/test_planner.py checks the sum against real runs.

# RSS of a fresh `python -m entrypoints.train` before the model loads: importing torch 222 MB, transformers +
# peft + bitsandbytes +205, datasets +82, mlflow +42 (552 MB, psutil after each import), SmolLM2's tokenizer
# +46, the bundled set's 3,000 tokenized examples +5 = 603 MB.
CPU_BASELINE_MB = 600.0
# What a CUDA context and torch's kernels take on the GPU before the first tensor: ~500 MB on recent GPUs
# (NVML's per-process figure); not measured here, this machine has no GPU.
CUDA_CONTEXT_MB = 500.0
# nf4/fp4: 4-bit codes + an 8-bit absmax per 64 weights + an fp32 absmax per 256 blocks (double quant) =
# 4 + 8/64 + 32/16,384 = 4.127 bits; without double quant the absmax is fp32: 4 + 32/64 = 4.5 bits.
NF4_BITS_DOUBLE_QUANT = 4.127
NF4_BITS = 4.5
# fp32 LoRA weight, its grad, and AdamW's exp_avg and exp_avg_sq: 4 x 4 bytes per trainable parameter.
LORA_BYTES_PER_PARAM = 16
# Under autocast, the bf16 copy of each LoRA weight that the forward makes and keeps for backward.
LORA_CAST_BYTES_PER_PARAM = 2
# A quantizing load on the CPU leaves memory behind. The bf16 embedding and norms stay zero-copy views of the
# checkpoint's mmap, so the pages the quantizer read stay resident (+211-214 MB in 8 loads of SmolLM2, whose
# 106 M quantized weights are 212 MB in bf16), and glibc keeps the fp32 temporaries of quantization in the
# loader threads' arenas: nf4 0-430 MB over 5 loads (bimodal; 4 bytes a weight at the high end), int8
# 139-221 MB over 3 (2 bytes a weight). The planner takes the high end: with it, the one SmolLM2 run measured
# (nf4, 4 x 512, its load kept 430 MB) peaked 3 % under the estimate, 4,736 vs 4,891 MB.
QUANT_LOAD_HEAP_BYTES = {"nf4": 4, "fp4": 4, "int8": 2}
# glibc's heap grows by more than the live tensors: freed temporaries of the forward and backward (fp32 casts
# of each LoRA input, dropout outputs, dequantized weights, gradients) leave holes that tensors of other sizes
# do not fill. Allocations of 32 MiB and more (glibc's highest mmap threshold) are mmapped and given back
# whole, so only smaller tensors count. Over 8 two-step runs of the trainer (4-layer Llama, nf4/int8/bf16/fp32,
# 2-8 x 256-512), peak RSS minus every other component was 44 MB + 0.70 x the heap-held tensors (activations,
# plus the loss workspace when its chunk is under 32 MiB), within +-50 MB. MALLOC_MMAP_THRESHOLD_=1048576
# shrinks the excess (195 -> 30 MB at 8 x 512) but slows CPU steps by ~70 %. Longer runs creep higher: one
# setting peaked at 1,188 MB after 2 steps, 1,297 after 12 and 1,384 after 40; these constants are for the
# first steps.
CPU_HEAP_SLACK_FIXED_MB = 44.0
CPU_HEAP_SLACK = 0.70
GLIBC_MMAP_MAX_BYTES = 32 * MB
# The chunked loss in backward holds 3 fp32 [chunk, vocab] tensors at once: the recomputed log-softmax it
# saves, the gradient of the NLL and the gradient of the log-softmax (peak RSS over the backward of one
# checkpointed chunk: 3.00 x chunk x vocab x 4 bytes for 256, 512 and 1,024 tokens, bf16 and fp32).
LOSS_FP32_LOGIT_COPIES = 3
# Where each Llama-style projection sits in a decoder layer's forward: in the first layer, whose input (the
# frozen embedding) needs no gradient, a tensor is saved only after the first adapted projection.
_STAGE = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one training run, in MB (2**20 bytes), by component."""

    baseline_mb: float  # the process before the model: CPU RSS of the imported stack, or the CUDA context
    weights_mb: float  # the frozen base as stored: quantized linears + embeddings, norms, head in bf16
    load_overhead_mb: float  # CPU, quantized bases: checkpoint pages and quantization heap the load leaves
    lora_mb: float  # LoRA weights, grads and AdamW states, fp32; under autocast, the weights' bf16 copies
    activations_mb: float  # tensors autograd saves for backward, every layer, at the start of the backward
    heap_slack_mb: float  # CPU: what glibc's heap holds beyond the live tensors in the first steps
    loss_mb: float  # the chunked loss's backward: 3 fp32 [chunk, vocab] tensors + the target hidden states
    total_mb: float
    trainable_params: int  # LoRA parameters, as peft's get_nb_trainable_parameters() counts them

    def components(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.endswith("_mb") and f.name != "total_mb"}


class MetaModel(NamedTuple):
    """A model built on the meta device (shapes only), with the names of its linear layers and of those LoRA adapts."""

    model: torch.nn.Module
    modules: dict[str, torch.nn.Module]  # by name, as named_modules() gives them
    linear: list[str]  # every linear layer LoRA could adapt (models.linear_module_names)
    adapted: list[str]  # the ones `target_modules` selects


def meta_model(model_config, target_modules: str) -> MetaModel:
    """`model_config`'s model on the meta device: nothing is allocated, so a 1B model's layers are counted in
    well under a second. The planner sizes memory from it and the benchmark counts model FLOPs from it."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    linear = linear_module_names(model)
    targets = resolve_target_modules(model, target_modules)
    adapted = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
    return MetaModel(model, dict(model.named_modules()), linear, adapted)


def _in_out_features(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) of nn.Linear (weight [out, in]) and of GPT-2's Conv1D (weight [in, out])."""
    rows, cols = module.weight.shape
    return (rows, cols) if isinstance(module, Conv1D) else (cols, rows)


def _weight_bytes(model_config, meta: MetaModel, quantization: str, double_quant: bool, cpu: bool) -> tuple[int, int]:
    """(bytes of the stored base weights, bytes the quantizing load holds on the CPU heap on top)."""
    model, modules, linear, _ = meta
    n_total = sum(p.numel() for p in model.parameters())  # a tied embedding and head count once
    n_linear = sum(modules[n].weight.numel() for n in linear)
    n_other = n_total - n_linear  # embeddings, norms, an untied head, biases: kept in the compute dtype
    if quantization in ("nf4", "fp4"):
        bits = NF4_BITS_DOUBLE_QUANT if double_quant else NF4_BITS
        weight_bytes = n_linear * bits / 8 + n_other * 2
    elif quantization == "int8":
        rows = sum(_in_out_features(modules[n])[1] for n in linear)
        weight_bytes = n_linear + rows * 4 + n_other * 2  # int8 codes + one fp32 scale per output row
    else:
        weight_bytes = n_total * {"bf16": 2, "fp16": 2, "fp32": 4}[quantization]
    load_bytes = 0
    if cpu and quantization in QUANT_LOAD_HEAP_BYTES:
        checkpoint_bytes = torch.finfo(getattr(model_config, "dtype", None) or torch.float32).bits // 8
        load_bytes = n_linear * (checkpoint_bytes + QUANT_LOAD_HEAP_BYTES[quantization])
    return weight_bytes, load_bytes


def _activation_bytes(
    cfg,
    meta: MetaModel,
    *,
    rank: int,
    quantization: str,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    dropout: float,
    cpu: bool,
) -> int:
    """What autograd keeps for the backward: per decoder layer, for batch_size x seq_len positions."""
    model, modules, linear, adapted = meta
    tokens = batch_size * seq_len
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    act = 4 if quantization == "fp32" else 2  # autocast's bf16 (fp16 on old GPUs), or fp32 without autocast
    # Each LoRA input stays in the compute dtype (models.keep_adapter_inputs_in_compute_dtype; peft's 4-bit and
    # int8 layers skip their cast under autocast themselves); the CPU's dropout saves its mask in that dtype, CUDA's
    # fused dropout a bool mask (1 byte)
    mask_bytes = (act if cpu else 1) if dropout > 0 else 0
    first_layer = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers)[0]
    prefix = next(n for n, m in model.named_modules() if m is first_layer) + "."
    in_first = [n for n in linear if n.startswith(prefix)]
    first_adapted = [(modules[n], _STAGE.get(n.rsplit(".", 1)[-1], 0)) for n in in_first if n in adapted]
    earliest = min((stage for _, stage in first_adapted), default=len(_STAGE))

    norm = tokens * (hidden + 1) * 4  # RMSNorm keeps its input upcast to fp32 (for pow and mul) and rsqrt
    # sdpa (CPU flash kernel) keeps q, k, v (k and v repeated to every head) and its output in the compute
    # dtype, an fp32 logsumexp, and the packed block-diagonal mask converted from bool to the compute dtype in
    # every layer: batch x seq_len^2 x 2 bytes, 2 MB a layer at 4 x 512, 32 MB at 4 x 2,048
    attention = 4 * tokens * heads * head_dim * act + tokens * heads * 4 + batch_size * seq_len**2 * act
    gated = any(n.rsplit(".", 1)[-1] in ("gate_proj", "w1", "gate_up_proj") for n in in_first)
    mlp = (3 if gated else 2) * tokens * inter * act  # gate and up outputs and the activation's output
    # bitsandbytes' CPU int8 matmul keeps its input on ctx.A, needed or not: the attention's and the MLP's
    # normed inputs and down_proj's input (o_proj's input is sdpa's output, already kept)
    int8_inputs = tokens * (2 * hidden + inter) * act if quantization == "int8" else 0

    projections = [(_in_out_features(m)[0], stage) for m, stage in first_adapted]  # (input features, stage)
    # lora_A's inputs: with dropout, dropout's output, one a projection; without, the layer's own tensor, kept once
    # for the projections that read it (q, k and v; gate and up; o_proj's input is sdpa's output, which `attention`
    # counts)
    if dropout > 0:
        lora_inputs = sum(f for f, _ in projections)
    else:
        lora_inputs = sum({s: f for f, s in projections if s != _STAGE["o_proj"]}.values())

    def lora_saved(input_needs_grad: Callable[[int], bool]) -> int:
        # per projection: dropout's mask and lora_B's input; and lora_A's inputs
        own = sum(f * (mask_bytes if input_needs_grad(s) else 0) + rank * act for f, s in projections)
        return tokens * (own + lora_inputs * act)

    layer = 2 * norm + attention + mlp + lora_saved(lambda _: True)
    layer0 = (
        (norm if earliest <= 1 else 0)  # post-attention norm; the input norm's input needs no gradient
        + (attention if earliest == 0 else 0)
        + (mlp if earliest <= 2 else 0)
        + lora_saved(lambda stage: earliest < stage)
    )
    if gradient_checkpointing:  # each layer keeps its input; the backward recomputes one layer at a time
        saved = layers * tokens * hidden * act + layer + int8_inputs
    else:
        saved = layer0 + (layers - 1) * layer + layers * int8_inputs + norm  # + the final norm
    return saved + 2 * tokens * head_dim * act  # the rotary cos and sin, shared by every layer


def estimate(
    model_config,
    *,
    rank: int,
    target_modules: str,
    quantization: str,
    batch_size: int,
    seq_len: int,
    double_quant: bool = True,
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    target_fraction: float = 1.0,
    dropout: float = 0.05,
) -> MemoryEstimate:
    """Peak memory of `trainer.train` with these settings, from a transformers config alone.

    The module list comes from the config on the meta device (nothing is allocated). Activations follow what
    autograd saves in a Llama-style decoder under the trainer's bf16 autocast (fp32 for quantization=fp32);
    other families get the same per-layer formula. Packed rows are seq_len long, so every micro-batch has
    batch_size x seq_len positions (padded unpacked batches are shorter: an upper bound for them);
    `target_fraction` of them are loss targets (1.0 for plain text or train_on_prompt, the upper bound; 0.17
    for the bundled instruct set packed to 512).
    """
    cpu = torch.device(device).type == "cpu"
    meta = meta_model(model_config, target_modules)
    weight_bytes, load_bytes = _weight_bytes(model_config, meta, quantization, double_quant, cpu)
    trainable = sum(rank * sum(_in_out_features(meta.modules[n])) for n in meta.adapted)  # LoRA's A and B
    saved = _activation_bytes(
        model_config,
        meta,
        rank=rank,
        quantization=quantization,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        dropout=dropout,
        cpu=cpu,
    )
    # the loss: the backward of one chunk of target positions
    tokens = batch_size * seq_len
    act = 4 if quantization == "fp32" else 2
    n_targets = math.ceil(target_fraction * tokens)
    chunk = min(n_targets, LOSS_CHUNK_TOKENS)
    loss_bytes = (
        LOSS_FP32_LOGIT_COPIES * chunk * model_config.vocab_size * 4 + n_targets * model_config.hidden_size * act
    )

    heap_slack = 0.0
    if cpu:
        heap_held = saved + (loss_bytes if chunk * model_config.vocab_size * 4 < GLIBC_MMAP_MAX_BYTES else 0)
        heap_slack = CPU_HEAP_SLACK_FIXED_MB * MB + CPU_HEAP_SLACK * heap_held

    parts = {
        "baseline_mb": CPU_BASELINE_MB if cpu else CUDA_CONTEXT_MB,
        "weights_mb": weight_bytes / MB,
        "load_overhead_mb": load_bytes / MB,
        "lora_mb": trainable
        * (LORA_BYTES_PER_PARAM + (0 if quantization == "fp32" else LORA_CAST_BYTES_PER_PARAM))
        / MB,
        "activations_mb": saved / MB,
        "heap_slack_mb": heap_slack / MB,
        "loss_mb": loss_bytes / MB,
    }
    return MemoryEstimate(**parts, total_mb=sum(parts.values()), trainable_params=trainable)


def predict_peak_mb(
    model_path: str,
    *,
    rows_target_fraction: float,
    device: str | torch.device,
    trust_remote_code: bool = False,
    **settings,
) -> float | None:
    """estimate()'s total for a train run's settings (rank, target_modules, quantization, batch_size, seq_len,
    double_quant, gradient_checkpointing, dropout), or None where the planner cannot tell.

    Advisory only: the planner knows Llama-, GPT-2- and NeoX-style blocks, and a model it cannot read must not
    stop a run that would train fine, so any failure here means "no prediction".
    """
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        return estimate(config, device=device, target_fraction=rows_target_fraction, **settings).total_mb
    except Exception:  # noqa: BLE001 - see the docstring
        return None


def available_mb(device: str | torch.device) -> float:
    """What a run on `device` can have now: the GPU's free memory, or the RAM the kernel says is available."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / MB
    return psutil.virtual_memory().available / MB
