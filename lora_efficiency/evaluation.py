"""Held-out loss and perplexity, token-weighted over target (response) tokens; padding and prompt excluded."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from lora_efficiency.data import Rows, collate
from lora_efficiency.loss import token_loss_sum


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    rows: Rows,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """eval/loss (mean cross-entropy per target token), eval/perplexity = exp(loss), eval/tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    # Batches of similar length pad less: the first 100 held-out examples of the bundled set (47-137 tokens)
    # took 8.8 s in their own order and 5.1 s sorted by length (SmolLM2 nf4, batches of 8, 2-core CPU), with
    # the same loss to 1e-8.
    order = sorted(range(len(rows)), key=lambda i: len(rows.input_ids[i]))
    for start in range(0, len(rows), batch_size):
        batch = collate(rows, order[start : start + batch_size], pad_id=pad_id)
        with autocast:
            loss_sum, n = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        total += float(loss_sum)
        count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(loss), "eval/tokens": float(count)}


# ---------------------------------------------------------------------------------------------------------
# Generation: exact match and inference speed


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes or trailing period: "Paris." == "paris"."""
    text = " ".join(text.strip().lower().split())
    return text.strip("\"'`").rstrip(".").strip()


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> tuple[list[str], dict[str, float]]:
    """Greedy answers to `prompts` (formatted with the model's template), in batches padded on the left.

    Returns the answers and the speed: generated tokens (up to and including each row's end of sequence)
    per second of generate() wall time, and milliseconds per generated token of one row.
    """
    from lora_efficiency.data import format_prompt
    from lora_efficiency.models import positions_of

    limit = positions_of(model.config)  # GPT-2's learned table (1,024) fails with IndexError past its end
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    answers, generated, seconds, decode_steps = [], 0, 0.0, 0
    for start in range(0, len(prompts), batch_size):
        texts = [format_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        new_tokens = max_new_tokens
        if limit and enc["input_ids"].shape[1] + max_new_tokens > limit:  # clamp: answers end at the last position
            keep = max(limit - max_new_tokens, limit // 2)  # a prompt longer than that keeps its end
            enc = {k: v[:, -keep:] for k, v in enc.items()}
            new_tokens = limit - enc["input_ids"].shape[1]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            out = model.generate(
                **enc,
                max_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1] :]
        decode_steps += new.shape[1]
        for row in new.tolist():
            n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            generated += n
            answers.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    model.train(was_training)
    speed = {
        "tokens_per_second": generated / seconds if seconds else 0.0,
        "latency_ms_per_token": 1000 * seconds / decode_steps if decode_steps else 0.0,
    }
    return answers, speed


def exact_match_scores(answers: list[str], references: list[str]) -> tuple[list[bool], dict[str, float]]:
    """Strict (after stripping) and normalised exact match; gsm8k-style references compare the final number."""
    from lora_efficiency.sources import gsm8k_final_answer

    strict, loose = [], []
    for answer, reference in zip(answers, references, strict=True):
        if "####" in reference:
            answer, reference = gsm8k_final_answer(answer), gsm8k_final_answer(reference)
        strict.append(answer.strip() == reference.strip())
        loose.append(normalize_answer(answer) == normalize_answer(reference))
    n = max(len(answers), 1)
    return strict, {"eval/exact_match": sum(strict) / n, "eval/exact_match_normalized": sum(loose) / n}


# Prompts timed for inference speed when no exact-match pass ran (that pass's own timing is used otherwise):
# one batch of 8 at the default eval_batch_size. Generation costs ~0.3 s a prompt at 48 new tokens on the
# 2-core CPU (SmolLM2, nf4: 16 prompts took 4.8 s, 30 took 10.1 s), which the quick study pays 28 times.
SPEED_PROMPTS = 8


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: dict[str, list]  # prompt, reference, output, correct, task: one entry per generated answer


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    *,
    eval_rows: Rows,
    eval_examples: list,
    exact_match: bool,
    generate_samples: int,
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    measure_merged: bool,
) -> EvalResult:
    """Held-out loss/perplexity, exact match over `generate_samples` examples, and inference speed (timed on
    the exact-match pass, or on SPEED_PROMPTS prompts when there is none).

    measure_merged merges the adapter into the base (peft's merge_and_unload, only for unquantized bases) for
    a last speed pass: `model` must not be used afterwards.
    """
    metrics = evaluate_loss(
        model, eval_rows, batch_size=batch_size, pad_id=pad_id, device=device, autocast_dtype=autocast_dtype
    )
    samples: dict[str, list] = {"prompt": [], "reference": [], "output": [], "correct": [], "task": []}
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
    speed = None
    if exact_match and generate_samples:
        chosen = eval_examples[:generate_samples]
        answers, speed = generate_answers(model, tokenizer, [e.prompt for e in chosen], **gen)
        correct, scores = exact_match_scores(answers, [e.response for e in chosen])
        metrics.update(scores)
        metrics["eval/generated_examples"] = float(len(chosen))
        samples = {
            "prompt": [e.prompt for e in chosen],
            "reference": [e.response for e in chosen],
            "output": answers,
            "correct": correct,
            "task": [e.task for e in chosen],
        }
    # Text sets have no prompts: their passages' first words stand in, so speed is measured the same way.
    prompts = [e.prompt or " ".join(e.response.split()[:32]) for e in eval_examples[:SPEED_PROMPTS]]
    if prompts:
        if speed is None:
            _, speed = generate_answers(model, tokenizer, prompts, **gen)
        metrics["inference/tokens_per_second"] = speed["tokens_per_second"]
        metrics["inference/latency_ms_per_token"] = speed["latency_ms_per_token"]
        if measure_merged and hasattr(model, "merge_and_unload"):
            merged = model.merge_and_unload()
            _, speed = generate_answers(merged, tokenizer, prompts, **gen)
            metrics["inference/merged_tokens_per_second"] = speed["tokens_per_second"]
            metrics["inference/merged_latency_ms_per_token"] = speed["latency_ms_per_token"]
    return EvalResult(metrics, samples)


def use_exact_match(setting: str, manifest: dict, data: str) -> bool:
    """auto: when the data has reference answers; true: always, but a plain-text set has nothing to match."""
    if setting == "true" and manifest["kind"] == "text":
        from lora_efficiency.errors import UserError

        raise UserError(
            f"exact_match=true but data={data!r} ({manifest['dataset']}) is plain text with no reference "
            "answers: use exact_match=auto or false, or an instruction data set"
        )
    return setting == "true" or (setting == "auto" and bool(manifest.get("has_references")))


def eval_settings_tag(**settings) -> str:
    """What an evaluation's numbers depend on, as a tag: the same tag means the same numbers."""
    import json

    return json.dumps(settings, sort_keys=True)
