"""Held-out loss and perplexity, token-weighted over target (response) tokens; padding and prompt excluded."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lora_efficiency.data import IGNORE_INDEX, Rows, TokenizedSplit, collate, format_prompt, tokenize_texts, unpacked
from lora_efficiency.errors import UserError
from lora_efficiency.loss import target_token_losses
from lora_efficiency.models import cache_root, positions_of
from lora_efficiency.sources import GSM8K, JSON, NUMBER, STRING, answer_kinds, gsm8k_final_answer, python_docs_texts

if TYPE_CHECKING:  # a type only: prepare.py imports datasets (~2 s), which a served model (mlflow_model) never needs
    from lora_efficiency.prepare import Prepared


def evaluate_loss(model: torch.nn.Module, rows: Rows, **scoring) -> dict[str, float]:
    """eval/loss (mean cross-entropy per target token), eval/perplexity = exp(loss), eval/tokens; with `families`
    (each row's task family) of two or more names, eval/loss/<family> and eval/perplexity/<family> beside them.
    `scoring`: evaluate_losses' keyword arguments (batch_size, pad_id, device, autocast_dtype, families)."""
    return evaluate_losses(model, rows, **scoring)[0]


@torch.no_grad()
def evaluate_losses(
    model: torch.nn.Module,
    rows: Rows,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    families: list[str] | None = None,
    pack_length: int = 0,
) -> tuple[dict[str, float], dict[str, list]]:
    """evaluate_loss's metrics, and the loss of every held-out example: a table with one row per example (its
    index in the held-out order, task family, target tokens, mean cross-entropy per target token), so that a report
    can count the examples' sampling noise and pair two runs example by example.

    pack_length > 0 packs the examples (families mixed) into rows of up to that many tokens (position ids restart,
    so each example attends to itself only, as in training; an example's first token is never a target, as in its
    own row):
    the first 100 held-out examples of the bundled set (7,678 tokens) took 23.3 s packed into 256-token rows, 4 a
    batch, against 28.6 s in padded batches of 8 (SmolLM2 nf4, 1 thread of this 2-core CPU, shared), the same loss
    to 1e-7.

    Token weighting lets families with long answers dominate eval/loss (bundled set, SmolLM2's tokenizer, with the
    end-of-sequence token: JSON answers 28-31 tokens, arithmetic 3-5): the per-family numbers show each on its own.
    """
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    families = families[: len(rows)] if families else [""] * len(rows)
    groups: dict[str, list[int]] = {}
    for i, family in enumerate(families):
        groups.setdefault(family, []).append(i)
    per_example: dict[int, tuple[float, int]] = {}
    # Batches of similar length pad less: the first 100 held-out examples of the bundled set (47-137 tokens)
    # took 8.8 s in their own order and 5.1 s sorted by length (SmolLM2 nf4, batches of 8, 2-core CPU), with
    # the same loss to 1e-8. Rows mix task families: every position's loss goes to its own example (owners), so
    # each family's sum is exact; kept apart, the six families' part-filled last rows took 7 forwards of
    # 256-token rows for those 100 examples instead of 5, 9.2-10.6 s against 8.4-9.3 s, the same loss to 1e-8
    # (SmolLM2 nf4, 2 threads, 2026-12-05).
    order = sorted(range(len(rows)), key=lambda i: len(rows.input_ids[i]))
    if pack_length:
        packed, owners = _pack_examples(rows, order, pack_length)
    else:  # each row one example
        packed, owners = rows, [[i] * len(rows.input_ids[i]) for i in order]
    for start in range(0, len(owners), batch_size):
        chosen = list(range(start, min(start + batch_size, len(owners))))
        batch = collate(packed, chosen if pack_length else order[start : start + batch_size], pad_id=pad_id)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        with autocast:
            losses = target_token_losses(model, {k: v.to(device) for k, v in batch.items()}).double().cpu()
        # the example of every target position (-1 on padding, never a target)
        owner = torch.tensor([owners[r] + [-1] * (mask.shape[1] + 1 - len(owners[r])) for r in chosen])
        owner = owner[:, 1:][mask]
        example_sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, owner, losses)
        example_counts = torch.bincount(owner, minlength=len(rows))
        for i in {i for r in chosen for i in owners[r]}:
            per_example[i] = (float(example_sums[i]), int(example_counts[i]))
    sums = {
        family: (sum(per_example[i][0] for i in members), sum(per_example[i][1] for i in members))
        for family, members in groups.items()
    }
    model.train(was_training)
    total, count = sum(t for t, _ in sums.values()), sum(n for _, n in sums.values())
    loss = total / max(count, 1)
    metrics = {"eval/loss": loss, "eval/perplexity": math.exp(loss), "eval/tokens": float(count)}
    if len(sums) > 1:
        for family, (total, count) in sorted(sums.items()):
            family_loss = total / max(count, 1)
            metrics[family_metric("eval/loss", family)] = family_loss
            metrics[family_metric("eval/perplexity", family)] = math.exp(family_loss)
    indices = sorted(per_example)
    table = {
        "example": indices,
        "task": [families[i] for i in indices],
        "tokens": [per_example[i][1] for i in indices],
        # an example whose answer seq_len cut off entirely has no target: no loss (None), not a zero
        "loss": [per_example[i][0] / per_example[i][1] if per_example[i][1] else None for i in indices],
    }
    return metrics, table


def _pack_examples(rows: Rows, order: list[int], length: int) -> tuple[Rows, list[list[int]]]:
    """The examples `order` packed greedily into rows of up to `length` tokens (an example longer than that gets
    a row of its own), and each position's example. The first label of every example is dropped: in its own row
    nothing predicts its first token, and in a packed one the example before it must not."""
    packed, owners = Rows(), []
    for i in order:
        ids, labels = rows.input_ids[i], [IGNORE_INDEX, *rows.labels[i][1:]]
        if not owners or len(packed.input_ids[-1]) + len(ids) > length:
            packed.input_ids.append([]), packed.labels.append([]), packed.position_ids.append([]), owners.append([])
        packed.input_ids[-1] += ids
        packed.labels[-1] += labels
        packed.position_ids[-1] += list(range(len(ids)))
        owners[-1] += [i] * len(ids)
    return packed, owners


# ---------------------------------------------------------------------------------------------------------
# Forgetting: general text that is not the task, scored before and after training


def forgetting_rows(tokenizer, *, samples: int, seq_len: int) -> Rows:
    """`samples` passages of general text that is not the task: the Python reference shipped with CPython
    (sources.python_docs_texts, ~300 passages of 256 words), taken evenly spread over it so that every part of the
    reference counts, each cut to seq_len tokens. Offline and fixed for a Python version, like the bundled data.
    peft's method_comparison measures forgetting the same way, as cross-entropy on general text (Wikipedia)."""
    texts = python_docs_texts()
    chosen = [texts[i * len(texts) // samples] for i in range(min(samples, len(texts)))]
    return unpacked(tokenize_texts(tokenizer, chosen, seq_len=seq_len))


def forgetting_metrics(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """forget/perplexity after training, forget/base_perplexity before its first step (the base alone: LoRA's B
    starts at zero, and full fine-tuning has not moved yet), and forget/ratio = after / before: above 1, the run
    lost some of what the base knew of text outside its task (Biderman et al. 2024, "LoRA Learns Less and Forgets
    Less")."""
    return {
        "forget/loss": after["eval/loss"],
        "forget/perplexity": after["eval/perplexity"],
        "forget/base_perplexity": before["eval/perplexity"],
        "forget/ratio": after["eval/perplexity"] / before["eval/perplexity"],
        "forget/tokens": after["eval/tokens"],
    }


# The library versions whose kernels produce a cached score: a new torch or bitsandbytes scores afresh.
SCORE_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")


def cached_scores(kind: str, key: dict, score: Callable[[], dict[str, float]]) -> tuple[dict[str, float], bool]:
    """`score()`, computed once per `key` (every input its numbers depend on, JSON-serialisable) and kept in
    <cache>/scores/<kind>-<digest>.json beside the prepared data; returns (the scores, whether they came from the
    cache). The key is stored beside the scores, so a file says what it holds."""

    versions = {}
    for name in SCORE_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = ""
    key = {**key, "libraries": versions}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = cache_root() / "scores" / f"{kind}-{digest}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):  # absent, or unreadable: score afresh
        stored = json.loads(path.read_text())
        if stored["key"] == json.loads(json.dumps(key, default=str)):
            return stored["scores"], True
    scores = score()
    path.parent.mkdir(parents=True, exist_ok=True)
    # written whole or not at all: concurrent sweep children (Ray) may score the same key at once
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{kind}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "scores": scores}, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)
    return scores, False


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
    fixed_length: bool = False,
) -> tuple[list[str], dict[str, float]]:
    """Greedy answers to `prompts` (formatted with the model's template), in batches padded on the left.

    Returns the answers and the speed: generated tokens (up to and including each row's end of sequence)
    per second of generate() wall time, and milliseconds per decoding step (one token of every row). The
    batch runs until its longest row ends, so that speed depends on how much answer lengths vary; with
    fixed_length, every row generates max_new_tokens (end of sequence suppressed until then: transformers'
    min_new_tokens), and the speed is the model's alone.
    """
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
                min_new_tokens=new_tokens if fixed_length else None,
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
        "generated_tokens": float(generated),
    }
    return answers, speed


# Numbers are equal within this relative tolerance (or 1e-9 absolute, for zero): "2500.0" == "2500" and
# float noise such as 0.30000000000000004 == 0.3 pass; 2500 against 2501 (4e-4 apart) does not.
NUMBER_REL_TOL = 1e-6
# A number as written in an answer: sign, thousands commas ("1,200"), decimals, exponent.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def _numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def _same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=NUMBER_REL_TOL, abs_tol=1e-9)


def _only_number(text: str) -> float | None:
    """The number of an answer that holds exactly one ("8", "8.0", "1,200 km", "The answer is 8."), else None:
    "5 + 3 = 8" holds three and is not an answer with the number only."""
    found = _numbers(text)
    return found[0] if len(found) == 1 else None


def gsm8k_number(text: str) -> float | None:
    """GSM8K's answer: the first number after the last "####" ("#### 18 dollars" -> 18); without a "####", the
    last number of the text (lm-evaluation-harness's "flexible-extract"), so a cut solution still scores its end."""
    _, marker, tail = text.rpartition("####")
    found = _numbers(tail if marker else text)
    return (found[0] if marker else found[-1]) if found else None


def _json_value(text: str):
    """The JSON value of an answer: the whole text, else the first object or array in it (a ```json fence or words
    such as "JSON:" around it allowed, as numbers may come with words); a sentinel when there is none."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if starts:
        try:
            return json.JSONDecoder().raw_decode(text, min(starts))[0]
        except ValueError:
            pass
    return _UNPARSED


_UNPARSED = object()


def answers_match(answer: str, reference: str, kind: str) -> bool:
    """Whether `answer` gives `reference`, compared as `kind` (sources.ANSWER_KINDS): "string" as normalised text,
    "number" as the one number of the answer (NUMBER_REL_TOL), "json" as parsed values (key order and spacing do
    not count), "gsm8k" as the final number after "####"."""
    if kind == NUMBER:
        expected = _only_number(reference)
        if expected is not None:
            return _same_number(_only_number(answer), expected)
    elif kind == GSM8K:
        return _same_number(gsm8k_number(answer), gsm8k_number(reference))
    elif kind == JSON:
        expected = _json_value(reference)
        if expected is not _UNPARSED:
            return _json_value(answer) == expected
    return normalize_answer(answer) == normalize_answer(reference)  # STRING, or a reference not of its kind


def family_metric(name: str, family: str) -> str:
    """`name/<family>`, with characters MLflow refuses in a metric name replaced: "eval/loss/json_extraction"."""
    safe = re.sub(r"[^A-Za-z0-9_.\- ]", "_", family)
    return f"{name}/{safe or 'untitled'}"


def exact_match_scores(
    answers: list[str], references: list[str], *, kinds: list[str], families: list[str]
) -> tuple[list[bool], list[bool], dict[str, float]]:
    """Per answer: strict (after stripping) and by-kind match; and the metrics: eval/exact_match (strict; gsm8k-style
    references compare the final number's text), eval/exact_match_normalized (normalised text), eval/exact_match_by_kind
    (answers_match) overall and, where examples have task families, per family."""
    strict, loose, by_kind = [], [], []
    for answer, reference, kind in zip(answers, references, kinds, strict=True):
        by_kind.append(answers_match(answer, reference, kind))
        if "####" in reference:
            answer, reference = gsm8k_final_answer(answer), gsm8k_final_answer(reference)
        strict.append(answer.strip() == reference.strip())
        loose.append(normalize_answer(answer) == normalize_answer(reference))
    n = max(len(answers), 1)
    metrics = {
        "eval/exact_match": sum(strict) / n,
        "eval/exact_match_normalized": sum(loose) / n,
        "eval/exact_match_by_kind": sum(by_kind) / n,
    }
    for family in sorted({f for f in families if f}):
        hits = [ok for ok, f in zip(by_kind, families, strict=True) if f == family]
        metrics[family_metric("eval/exact_match_by_kind", family)] = sum(hits) / len(hits)
    return strict, by_kind, metrics


# Generation speed is timed on its own pass: SPEED_PROMPTS prompts (one batch at the default eval_batch_size), each
# generating exactly SPEED_NEW_TOKENS tokens with the end of sequence suppressed. Timing the exact-match pass instead
# mixed the model's speed with its answers' lengths: a batch runs until its longest answer ends while only each
# answer's own tokens counted, so a model whose answers vary more in length looked slower.
SPEED_PROMPTS = 8
SPEED_NEW_TOKENS = 32
# Older runs logged inference/tokens_per_second (and merged_, latency_) from the exact-match pass's timing: the
# report shows it apart, labelled, where runs have it.


# The artifact holding every held-out example's loss (evaluate_losses' table), in MLflow's table format
# (mlflow.load_table reads it back; the UI shows it beside the run)
PER_EXAMPLE_LOSSES = "per_example_losses.json"


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: dict[str, list]  # prompt, reference, output, correct, task: one entry per generated answer
    per_example: dict[str, list]  # example, task, tokens, loss: one entry per held-out example scored


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
    answer_kinds: dict[str, str],
    pack_length: int = 0,
) -> EvalResult:
    """Held-out loss/perplexity, exact match over `generate_samples` examples, and, when generate_samples > 0,
    generation speed (a fixed-length pass over the first SPEED_PROMPTS prompts, SPEED_NEW_TOKENS tokens each).

    measure_merged merges the adapter into the base (peft's merge_and_unload, only for unquantized bases) for
    a last speed pass: `model` must not be used afterwards. answer_kinds maps a task family to how its answers
    are compared (sources.answer_kinds; "" for every other family). pack_length: evaluate_losses'.
    """
    metrics, per_example = evaluate_losses(
        model,
        eval_rows,
        batch_size=batch_size,
        pad_id=pad_id,
        device=device,
        autocast_dtype=autocast_dtype,
        families=[e.task for e in eval_examples],
        pack_length=pack_length,
    )
    samples: dict[str, list] = {k: [] for k in ("prompt", "reference", "output", "correct", "correct_by_kind", "task")}
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
    if exact_match and generate_samples:
        chosen = eval_examples[:generate_samples]
        answers, _ = generate_answers(model, tokenizer, [e.prompt for e in chosen], **gen)
        kinds = [answer_kinds.get(e.task, answer_kinds.get("", STRING)) for e in chosen]
        correct, by_kind, scores = exact_match_scores(
            answers, [e.response for e in chosen], kinds=kinds, families=[e.task for e in chosen]
        )
        metrics.update(scores)
        metrics["eval/generated_examples"] = float(len(chosen))
        samples = {
            "prompt": [e.prompt for e in chosen],
            "reference": [e.response for e in chosen],
            "output": answers,
            "correct": correct,
            "correct_by_kind": by_kind,
            "task": [e.task for e in chosen],
        }
    # Text sets have no prompts: their passages' first words stand in, so speed is measured the same way. Only
    # where answers are generated (generate_samples > 0): 8 prompts x 32 tokens (and the merged pass on unquantized
    # bases) in every seed's run, which the quick and standard profiles (generate_samples: 0) never read.
    prompts = [e.prompt or " ".join(e.response.split()[:32]) for e in eval_examples[:SPEED_PROMPTS]]
    prompts = prompts if generate_samples else []
    timed = {**gen, "max_new_tokens": SPEED_NEW_TOKENS, "fixed_length": True}
    if prompts:
        _, speed = generate_answers(model, tokenizer, prompts, **timed)
        metrics["inference/decode_tokens_per_second"] = speed["tokens_per_second"]
        metrics["inference/decode_latency_ms_per_token"] = speed["latency_ms_per_token"]
        if measure_merged and hasattr(model, "merge_and_unload"):
            merged = model.merge_and_unload()
            _, speed = generate_answers(merged, tokenizer, prompts, **timed)
            metrics["inference/merged_decode_tokens_per_second"] = speed["tokens_per_second"]
            metrics["inference/merged_decode_latency_ms_per_token"] = speed["latency_ms_per_token"]
    return EvalResult(metrics, samples, per_example)


def use_exact_match(setting: str, manifest: dict, data: str) -> bool:
    """auto: when the data has reference answers; true: always, but a plain-text set has nothing to match."""
    if setting == "true" and manifest["kind"] == "text":
        raise UserError(
            f"exact_match=true but data={data!r} ({manifest['dataset']}) is plain text with no reference "
            "answers: use exact_match=auto or false, or an instruction data set"
        )
    return setting == "true" or (setting == "auto" and bool(manifest.get("has_references")))


def eval_settings_tag(prepared: Prepared, *, eval_samples: int, generate_samples: int, max_new_tokens: int) -> str:
    """What an evaluation of `prepared`'s held-out split depends on, as a tag (`eval_settings`, set by a train run
    and by `evaluate`): the same tag means the same numbers."""
    settings = {
        "data_fingerprint": prepared.manifest["fingerprint"],
        "eval_samples": eval_samples,
        "generate_samples": generate_samples,
        "max_new_tokens": max_new_tokens,
    }
    if prepared.eval_balanced:  # only then: runs on sets without task families keep the tag they always had
        settings["eval_order"] = "balanced"
    return json.dumps(settings, sort_keys=True)


@dataclass(frozen=True)
class Scoring:
    """The final evaluation of `prepared`'s held-out split, as a train run and `evaluate` both make it: one place for
    what is scored (the first eval_samples examples, exact match where the data and setting allow it) and for the
    eval_settings tag that says so, known before any weights load (evaluate compares it with the train run's)."""

    prepared: Prepared
    eval_samples: int
    exact_match: bool  # use_exact_match's answer for the setting and this data
    generate_samples: int
    max_new_tokens: int
    batch_size: int

    @classmethod
    def of(cls, prepared: Prepared, *, data: str, exact_match: str, **counts: int) -> Scoring:
        """From the settings (exact_match: auto, true or false); an exact_match=true on plain text is a UserError."""
        return cls(prepared, exact_match=use_exact_match(exact_match, prepared.manifest, data), **counts)

    @property
    def tag(self) -> str:
        """The eval_settings tag: generate_samples counts where answers are generated and matched, else 0."""
        return eval_settings_tag(
            self.prepared,
            eval_samples=self.eval_samples,
            generate_samples=self.generate_samples if self.exact_match else 0,
            max_new_tokens=self.max_new_tokens,
        )

    def run(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        measure_merged: bool,
        eval_rows: Rows | None = None,
        pack_length: int = 0,
    ) -> EvalResult:
        """evaluate_model on the first eval_samples held-out examples (eval_rows: those rows, when already built)."""
        n, held_out = self.eval_samples, self.prepared.eval
        return evaluate_model(
            model,
            tokenizer,
            eval_rows=eval_rows
            if eval_rows is not None
            else unpacked(TokenizedSplit(held_out.input_ids[:n], held_out.labels[:n])),
            eval_examples=self.prepared.eval_examples[:n],
            exact_match=self.exact_match,
            generate_samples=self.generate_samples,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            pad_id=tokenizer.pad_token_id,
            device=device,
            autocast_dtype=autocast_dtype,
            measure_merged=measure_merged,
            answer_kinds=answer_kinds(self.prepared.manifest),
            pack_length=pack_length,
        )
