"""Figures the benchmark computes or reads rather than trains for: model FLOPs per token, the device's matmul
rates (the MFU's denominator), where a launch's import time goes, and the machine and package versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from pathlib import Path

import psutil
import torch

from lora_efficiency.planner import meta_model


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
    model, modules, linear, adapted = meta_model(config, target_modules)
    frozen = sum(modules[n].weight.numel() for n in linear)
    lora = sum(rank * sum(modules[n].weight.shape) for n in adapted)  # A is r x in, B is out x r
    head = model.get_output_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    parts = {"frozen_linear": 4.0 * frozen, "lora": 6.0 * lora, "head": 4.0 * head, "attention": attention}
    return {
        **parts,
        "total": sum(parts.values()),
        "frozen_params": float(frozen),
        "lora_params": float(lora),
        "head_params": float(head),
        "attention_per_pair": attention / context,  # 12 x L x H x Q
    }


def performed_flops_per_token(parts: dict[str, float], performed: dict[str, float]) -> float:
    """FLOPs one side actually computes per real token, from what it counted (`performed`, per real token:
    positions computed, padding included; positions the head runs on and its FLOPs a head weight; attention
    query-key pairs) and the per-weight counts of training_flops_per_token (`parts`):

        positions x (4 x frozen linear + 6 x LoRA weights)       [6 and 8 with gradient checkpointing]
      + head positions x head_factor x head weights              [4; the project recomputes it: 6]
      + attention pairs x 12 x layers x heads x head_dim         [16 with gradient checkpointing]

    Gradient checkpointing recomputes each decoder layer's forward in backward (+2 a weight, +4 a pair)."""
    recompute = bool(performed.get("gradient_checkpointing"))
    linear = (6 if recompute else 4) * parts["frozen_params"] + (8 if recompute else 6) * parts["lora_params"]
    per_pair = parts["attention_per_pair"] * (16 / 12 if recompute else 1)
    return (
        performed["positions_per_token"] * linear
        + performed["head_positions_per_token"] * performed["head_factor"] * parts["head_params"]
        + performed["attention_pairs_per_token"] * per_pair
    )


def matmul_rates(device, *, repeats: int = 10) -> dict[str, float]:
    """Dense matmul FLOP/s in bf16 and fp32 (2048^3 on a CPU, 8192^3 on a GPU), median of `repeats`."""
    size = 8192 if device.type == "cuda" else 2048
    rates = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        rates[name] = 2 * size**3 / _matmul_seconds(a, b, device, repeats=repeats, warmup=3)
    return {"size": size, "bf16_flops": rates["bf16"], "fp32_flops": rates["fp32"]}


def model_matmul_rate(model_config, rows: int, device, *, repeats: int = 5) -> dict[str, float]:
    """bf16 FLOP/s of the model's own frozen-layer products at a training step's shape: for every frozen linear
    layer (the MFU's largest share), its forward (`rows` x in @ in x out) and its input gradient (rows x out @
    out x in), each distinct shape timed `repeats` times (median) and weighted by how many layers have it. Over
    the 2048^3 rate this is the MFU a step would reach if it did nothing but these products: the ceiling the
    rest of the step (attention, casts, the optimizer) only lowers. The head and LoRA's rank-r products are left
    out (the head runs in chunks of the targets, LoRA is 2% of the FLOPs)."""
    _, modules, linear, _ = meta_model(model_config, "attention")
    shapes: dict[tuple[int, int], int] = {}
    for name in linear:
        out_features, in_features = modules[name].weight.shape
        shapes[(in_features, out_features)] = shapes.get((in_features, out_features), 0) + 1
    flops = seconds = 0.0
    for (n_in, n_out), count in shapes.items():
        w = torch.randn(n_out, n_in, dtype=torch.bfloat16, device=device)
        x = torch.randn(rows, n_in, dtype=torch.bfloat16, device=device)
        g = torch.randn(rows, n_out, dtype=torch.bfloat16, device=device)
        for a, b in ((x, w.T), (g, w)):  # forward; input gradient
            flops += count * 2 * rows * n_in * n_out
            seconds += count * _matmul_seconds(a, b, device, repeats=repeats, warmup=2)
    return {"rows": rows, "layers": len(linear), "shapes": len(shapes), "bf16_flops": flops / seconds}


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, device, *, repeats: int, warmup: int) -> float:
    """Median seconds of `a @ b` over `repeats` products, after `warmup` untimed ones (thread pool, kernel choice)."""
    times = []
    for i in range(repeats + warmup):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device) -> None:
    """Wait for the GPU's queued kernels, so a clock read after it times the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def machine(device: str) -> dict:
    """The CPU (and whether it has AVX512-BF16, which decides the CPU's bf16 speed), cores, RAM and the GPU."""
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
    names = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "mlflow")
    return {"python": platform.python_version(), **{n: importlib.metadata.version(n) for n in names}}
