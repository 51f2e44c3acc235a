"""lora-efficiency: measure which LoRA rank, target modules and quantization give the best quality per GB and hour."""

__version__ = "0.1.0"

import logging

# bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import on AVX512-BF16 CPUs (the
# kernel lives on the hub) and falls back to its built-in 4-bit path. Silenced here, before any module of the package
# can import it (peft imports bitsandbytes): a false alarm on every run's log, and a second line before a one-line
# `error:` of generate, merge and evaluate.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
