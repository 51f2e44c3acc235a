"""The reference sides of the benchmark: HF `Trainer` + PEFT, run as the `reference` worker on the project's
tokenized examples, so every side sees the same tokens.

- naive (spec strong=False): as the quick-start guides write it: `DataCollatorForLanguageModeling` padding random
  micro-batches to their longest example, the loss on every token (prompt included), and on k-bit bases
  `prepare_model_for_kbit_training` with its defaults (gradient checkpointing on).
- strong (spec strong=True): what a careful user writes with the same libraries: completion-only labels (the
  project's labels, -100 on the prompt, padded with -100 by `DataCollatorForSeq2Seq`), micro-batches grouped by
  length (`train_sampling_strategy="group_by_length"`, transformers' LengthGroupedSampler), sdpa attention, and
  gradient checkpointing as the project's run has it (off) on every base; with spec torch_compile=True also
  `TrainingArguments(torch_compile=True)`.

Both count what they compute for the performed-FLOPs MFU: positions (padding included), the positions the output
head runs on (all of them: a causal LM's forward computes every position's logits) and attention pairs (each
padded micro-batch computes width x width scores a row)."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

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
)
from lora_efficiency.bench.workers import StepWindow, prepared_data
from lora_efficiency.memory import MemorySampler
from lora_efficiency.models import compute_dtype, resolve_target_modules


def reference_worker(spec: dict) -> dict:
    """HF Trainer + PEFT as a user writes it, on the same tokenized examples as the project."""
    hf_logging.set_verbosity_error()
    device = torch.device(spec["device"])
    source, tokenizer, prepared = prepared_data(spec)
    # The project's tokenization (chat template, truncated to seq_len): the same tokens on both sides.
    strong = bool(spec.get("strong"))
    if strong:
        dataset = Dataset.from_dict({"input_ids": prepared.train.input_ids, "labels": prepared.train.labels})
        inner = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding="longest")
    else:
        dataset = Dataset.from_dict({"input_ids": prepared.train.input_ids})
        inner = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    model = _peft_model(source.path, device, spec["mode"], gradient_checkpointing=not strong, sdpa=strong)
    collator = _CountingCollator(inner)
    window = StepWindow.for_spec(device, spec)
    clock = _clock_callback(device, window)
    args = _training_arguments(spec, device)
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock]).train()
    warm, seen = spec["warmup_steps"], clock.tokens_seen
    checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
    return {
        "step_times_s": window.measured(warm),
        "step_tokens": [b - a for a, b in zip(seen[warm - 1 : -1], seen[warm:], strict=True)],
        "peak_memory_mb": clock.sampler.summary()["memory/peak_mb"],
        "padding_fraction": 1 - collator.real / max(collator.positions, 1),
        "performed": {**collator.performed(head_factor=4), "gradient_checkpointing": checkpointing},
        "gradient_checkpointing": checkpointing,
        "profile": window.profile,
    }


def _peft_model(path: str, device, mode: str, *, gradient_checkpointing: bool, sdpa: bool):
    """The base stored as `mode` (bitsandbytes for nf4/fp4/int8), wrapped in PEFT's LoRA as the guides do;
    gradient_checkpointing: what prepare_model_for_kbit_training turns on for k-bit bases; sdpa: asked for by name
    (attn_implementation="sdpa"), as a careful user does, rather than left to the model's default."""
    dtype = compute_dtype(device)
    kwargs: dict = {"dtype": dtype if mode != "fp32" else torch.float32}
    if sdpa:
        kwargs["attn_implementation"] = "sdpa"
    if mode in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    elif mode == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "quantization_config" in kwargs:
        # The QLoRA recipe of the PEFT docs. With its defaults it upcasts the non-quantized weights (embedding,
        # norms) to fp32 and turns on gradient checkpointing: less activation memory, a slower backward.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=resolve_target_modules(model, TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _training_arguments(spec: dict, device):
    """The benchmark's recipe as TrainingArguments: same schedule and steps as the project, nothing saved or
    logged, and the Trainer's own count of non-padding input tokens."""
    dtype, mode = compute_dtype(device), spec["mode"]
    return TrainingArguments(
        train_sampling_strategy="group_by_length" if spec.get("strong") else "random",
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
        # strong, compiled: the whole model through torch.compile (inductor), as Trainer does it; each new padded
        # width may compile again, which the warm-up steps absorb only in part: a cost this user pays too
        torch_compile=bool(spec.get("torch_compile")),
    )


def _clock_callback(device, window: StepWindow):
    """A TrainerCallback that samples memory over training, stamps each optimizer step's end in `window` and
    keeps the Trainer's running count of non-padding input tokens (`tokens_seen`, one entry a step)."""

    class Clock(TrainerCallback):
        sampler = None

        def __init__(self):
            self.tokens_seen: list[int] = []

        def on_train_begin(self, args, state, control, **kw):
            self.sampler = MemorySampler(device).start()

        def on_step_end(self, args, state, control, **kw):
            window.step_end(state.global_step)
            self.tokens_seen.append(int(state.num_input_tokens_seen))

        def on_train_end(self, args, state, control, **kw):
            self.sampler.stop()

    return Clock()


class _CountingCollator:
    """Counts the positions, real tokens and attention pairs of every batch it pads (padding fraction, FLOPs)."""

    def __init__(self, inner):
        self.inner, self.positions, self.real, self.pairs = inner, 0, 0, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        rows, width = batch["attention_mask"].shape
        self.positions += rows * width
        self.real += int(batch["attention_mask"].sum())
        self.pairs += rows * width * width
        return batch

    def performed(self, *, head_factor: int) -> dict[str, float]:
        """Per real token: positions computed, positions the head runs on (x head_factor FLOPs a weight), pairs."""
        real = max(self.real, 1)
        return {
            "positions_per_token": self.positions / real,
            "head_positions_per_token": self.positions / real,
            "head_factor": head_factor,
            "attention_pairs_per_token": self.pairs / real,
        }
