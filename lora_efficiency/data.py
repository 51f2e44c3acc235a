"""Instruction data: the bundled generated set, chat-template formatting, response-only labels and packing."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from datetime import date, timedelta

import torch

IGNORE_INDEX = -100  # label of a token that is not predicted (prompt, padding, first token of an example)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    task: str = ""


# ---------------------------------------------------------------------------------------------------------
# The bundled instruction set: six task families with one exact answer each, generated from a seed.

_NAMES = [
    "Maria",
    "Kenji",
    "Amara",
    "Lukas",
    "Priya",
    "Diego",
    "Sofia",
    "Omar",
    "Elena",
    "Tariq",
    "Ines",
    "Hugo",
    "Yara",
    "Felix",
    "Nadia",
    "Mateo",
    "Leila",
    "Ivan",
    "Chloe",
    "Ravi",
]
_CITIES = [
    "Lisbon",
    "Osaka",
    "Nairobi",
    "Berlin",
    "Pune",
    "Bogota",
    "Madrid",
    "Cairo",
    "Athens",
    "Rabat",
    "Porto",
    "Lyon",
    "Quito",
    "Oslo",
    "Hanoi",
    "Kyiv",
    "Dublin",
    "Lima",
    "Perth",
    "Tunis",
]
_JOBS = ["nurse", "engineer", "teacher", "pilot", "chef", "architect", "librarian", "farmer", "lawyer", "baker"]
_WORDS = [
    "planet",
    "garden",
    "silver",
    "window",
    "rocket",
    "forest",
    "candle",
    "bridge",
    "pocket",
    "orange",
    "marble",
    "tunnel",
    "anchor",
    "violin",
    "harbor",
    "jacket",
    "meadow",
    "lantern",
    "pepper",
    "castle",
    "spiral",
    "copper",
    "falcon",
    "glacier",
    "island",
    "kettle",
    "ladder",
    "mirror",
    "needle",
    "parrot",
]
_FILLER = [
    "The weather had been mild all week.",
    "Everyone agreed the meeting ran long.",
    "A new cafe opened on the corner last spring.",
    "The train was delayed by twenty minutes.",
    "Nobody remembered who had brought the cake.",
    "The library closes early on Sundays.",
    "Several neighbours were repainting their fences.",
    "The report was finally submitted on time.",
]
_UNITS = [
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("L", "mL", 1000),
    ("days", "hours", 24),
    ("cm", "mm", 10),
]
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def _arithmetic(rng: random.Random) -> Example:
    op = rng.choice("+-*")
    a, b = (rng.randint(10, 999), rng.randint(10, 999)) if op != "*" else (rng.randint(2, 99), rng.randint(2, 99))
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Example(f"Compute {a} {op} {b}. Answer with the number only.", str(answer), "arithmetic")


def _unit_conversion(rng: random.Random) -> Example:
    src, dst, factor = rng.choice(_UNITS)
    value = rng.randint(1, 99) if rng.random() < 0.6 else rng.randint(1, 99) + rng.choice([0.5, 0.25, 0.2])
    result = value * factor
    answer = str(int(result)) if float(result).is_integer() else f"{result:g}"
    return Example(f"Convert {value:g} {src} to {dst}. Answer with the number only.", answer, "unit_conversion")


def _date_format(rng: random.Random) -> Example:
    d = date(1990, 1, 1) + timedelta(days=rng.randint(0, 365 * 40))
    formats = [
        ("YYYY-MM-DD", d.isoformat()),
        ("DD/MM/YYYY", d.strftime("%d/%m/%Y")),
        ("MM/DD/YYYY", d.strftime("%m/%d/%Y")),
        ("Month D, YYYY", f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"),
    ]
    (_, given), (name, answer) = rng.sample(formats, 2)
    return Example(f"Rewrite the date {given} in the format {name}. Answer with the date only.", answer, "date_format")


def _sorting(rng: random.Random) -> Example:
    n = rng.randint(3, 12)
    if rng.random() < 0.5:
        items = rng.sample(range(1, 1000), n)
        order = rng.choice(["ascending", "descending"])
        answer = sorted(items, reverse=order == "descending")
        prompt = f"Sort these numbers in {order} order: {', '.join(map(str, items))}. Answer as a comma-separated list."
    else:
        items = rng.sample(_WORDS, n)
        answer = sorted(items)
        prompt = f"Sort these words alphabetically: {', '.join(items)}. Answer as a comma-separated list."
    return Example(prompt, ", ".join(map(str, answer)), "sorting")


def _string_transform(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(1, 4))
    text = " ".join(words)
    kind = rng.choice(["reverse", "upper", "initials", "count"])
    if kind == "reverse":
        return Example(f"Reverse the letters of '{text}'. Answer with the result only.", text[::-1], "string")
    if kind == "upper":
        return Example(f"Write '{text}' in capital letters. Answer with the result only.", text.upper(), "string")
    if kind == "initials":
        return Example(
            f"Write the first letter of each word in '{text}'. Answer with the letters only.",
            "".join(w[0] for w in words),
            "string",
        )
    letter = rng.choice("aeiou")
    return Example(
        f"How many times does the letter '{letter}' appear in '{text}'? Answer with the number only.",
        str(text.count(letter)),
        "string",
    )


def _json_extraction(rng: random.Random) -> Example:
    name, city, job, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS), rng.randint(19, 80)
    fact = rng.choice(
        [
            f"{name} is {age} years old, works as a {job} and lives in {city}.",
            f"Living in {city}, {name} ({age}) has worked as a {job} for years.",
            f"At {age}, {name} moved to {city} to start a job as a {job}.",
        ]
    )
    sentences = rng.sample(_FILLER, rng.randint(0, 5))
    sentences.insert(rng.randint(0, len(sentences)), fact)
    answer = json.dumps({"name": name, "age": age, "city": city, "job": job})
    prompt = (
        "Extract the person's name, age, city and job from the text as JSON with the keys name, age, city "
        f"and job. Answer with the JSON only.\n\nText: {' '.join(sentences)}"
    )
    return Example(prompt, answer, "json_extraction")


TASKS = (_arithmetic, _unit_conversion, _date_format, _sorting, _string_transform, _json_extraction)


def bundled_instruct(
    num_train: int = 3000, num_eval: int = 300, seed: int = 1234
) -> tuple[list[Example], list[Example]]:
    """The bundled instruction set: distinct prompts, split into train and eval with no prompt in both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[Example] = []
    while len(examples) < num_train + num_eval:
        ex = TASKS[len(examples) % len(TASKS)](rng)  # round robin: every family equally represented
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            examples.append(ex)
    rng.shuffle(examples)
    return examples[:num_train], examples[num_train:]


EVAL_ORDER_SEED = 0  # one order for every run, whatever its training seed: paired comparisons see the same examples


def balanced_order(tasks: list[str], *, seed: int = EVAL_ORDER_SEED) -> list[int]:
    """Indices of a held-out split in an order whose prefixes are balanced over task families: each family
    shuffled by `seed`, then one of each family in turn (sorted names) while every family has one left. The first
    N are the eval subset: the bundled set's first 100 held-out examples in stored order held 26 string and 12 JSON
    tasks, in this order 16 or 17 of each of its six families. The validation curve takes the last M, which is
    what the prefix leaves (its 300 held-out examples hold only 37 JSON tasks: 20 of its last 200 are JSON).

    A split with fewer than two families keeps its order (the same examples as before, for sets without families).
    """
    families: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        families.setdefault(task, []).append(i)
    if len(families) < 2:
        return list(range(len(tasks)))
    rng = random.Random(seed)
    queues = []
    for name in sorted(families):
        members = families[name][:]
        rng.shuffle(members)
        queues.append(members)
    order = []
    for turn in range(max(map(len, queues))):
        order += [q[turn] for q in queues if turn < len(q)]
    return order


# ---------------------------------------------------------------------------------------------------------
# Formatting and tokenization


def format_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer: the chat template if the tokenizer has one, else Alpaca's."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return ALPACA_PROMPT.format(prompt=prompt)


def format_example(tokenizer, example: Example) -> tuple[str, str]:
    """(prompt text, full text); the full text starts with the prompt text."""
    prompt_text = format_prompt(tokenizer, example.prompt)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.response}]
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full_text.startswith(prompt_text):  # templates that rewrite earlier turns: fall back to appending
            full_text = prompt_text + example.response + tokenizer.eos_token
    else:
        full_text = prompt_text + example.response + tokenizer.eos_token
    return prompt_text, full_text


@dataclass
class TokenizedSplit:
    input_ids: list[list[int]]
    labels: list[list[int]]
    num_truncated: int = 0


def text_bound(tokenizer, seq_len: int) -> int:
    """How many characters of one text can matter to its first seq_len + 1 tokens: a token covers at most as many
    characters as its longest vocabulary entry (81 for SmolLM2's byte-level vocabulary: one entry character per
    byte, and a character is at least one byte), so (seq_len + 1) x that many characters hold more tokens than a
    row keeps, and truncation is still seen and counted. Twice that leaves room for a normalizer that drops
    characters. Texts are cut to this before the tokenizer sees them: a 20 MB JSONL line peaked at 3.5 GB at
    seq_len 128 and a 200 MB one aborted the Rust tokenizer (exit 134); at seq_len 128 the bound is 20,898."""
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=1)
    except (AttributeError, NotImplementedError, TypeError):  # a tokenizer without a vocabulary to list
        longest = 128
    return 2 * (seq_len + 1) * max(longest, 1)


def tokenize(tokenizer, examples: list[Example], *, seq_len: int, train_on_prompt: bool = False) -> TokenizedSplit:
    """Token ids and labels per example; labels are IGNORE_INDEX on the prompt unless train_on_prompt.

    Rows longer than seq_len are truncated and counted. The first token is never a target, so that packing an
    example after another never asks the model to predict across the boundary. The prompt and the response are
    each cut to text_bound() characters first: what lies beyond can never reach the row.
    """
    out = TokenizedSplit([], [])
    bound = text_bound(tokenizer, seq_len)
    for ex in examples:
        if len(ex.prompt) > bound or len(ex.response) > bound:
            ex = Example(ex.prompt[:bound], ex.response[:bound], ex.task)
        prompt_text, full_text = format_example(tokenizer, ex)
        prompt_len = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
        labels[0] = IGNORE_INDEX
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            out.num_truncated += 1
        out.input_ids.append(list(ids))
        out.labels.append(labels)
    return out


def tokenize_texts(tokenizer, texts: list[str], *, seq_len: int) -> TokenizedSplit:
    """Plain text for causal-LM perplexity: every token is a target but the first; one row per text."""
    out = TokenizedSplit([], [])
    bound = text_bound(tokenizer, seq_len)  # what lies beyond can never reach the row
    for text in texts:
        ids = tokenizer(text[:bound], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > seq_len:
            ids = ids[:seq_len]
            out.num_truncated += 1
        out.input_ids.append(ids)
        out.labels.append([IGNORE_INDEX, *ids[1:]])
    return out


def fingerprint(*splits: TokenizedSplit) -> str:
    """Content hash of the tokenized splits: same text, template and tokenizer -> same fingerprint."""
    h = hashlib.sha256()
    for split in splits:
        for ids, labels in zip(split.input_ids, split.labels, strict=True):
            h.update(json.dumps([ids, labels]).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Rows and batches. Every row carries position_ids that restart at 0 for each example (and for the padding
# tail); with attention_mask=None transformers turns them into a block-diagonal causal mask, so packed
# examples never attend to each other and one code path serves packed and padded batches.


@dataclass
class Rows:
    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    position_ids: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(split: TokenizedSplit, *, seq_len: int) -> Rows:
    """Greedy packing in order: examples are appended to a row while they fit in seq_len."""
    rows = Rows()
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for ex_ids, ex_labels in zip(split.input_ids, split.labels, strict=True):
        if ids and len(ids) + len(ex_ids) > seq_len:
            rows.input_ids.append(ids)
            rows.labels.append(labels)
            rows.position_ids.append(positions)
            ids, labels, positions = [], [], []
        ids = ids + ex_ids
        labels = labels + ex_labels
        positions = positions + list(range(len(ex_ids)))
    if ids:
        rows.input_ids.append(ids)
        rows.labels.append(labels)
        rows.position_ids.append(positions)
    return rows


def unpacked(split: TokenizedSplit) -> Rows:
    return Rows(
        [list(x) for x in split.input_ids],
        [list(x) for x in split.labels],
        [list(range(len(x))) for x in split.input_ids],
    )


# Every new activation shape costs the CPU heap memory it rarely returns: with packed rows of their natural
# length (477-512 tokens) RSS grew ~25 MB a step (3.55 -> 4.20 GB over 25 steps of SmolLM2, nf4, 4 x 512),
# with rows padded to seq_len it stayed at 3.52 GB. So packed batches are always seq_len long, and padded
# batches round their length up to a multiple of PAD_MULTIPLE, which bounds the number of distinct shapes.
PAD_MULTIPLE = 64


def collate(rows: Rows, indices: list[int], *, pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad the chosen rows to `length`, or to their longest rounded up to PAD_MULTIPLE, as LongTensors."""
    if length is None:
        longest = max(len(rows.input_ids[i]) for i in indices)
        length = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    for i in indices:
        pad = length - len(rows.input_ids[i])
        batch["input_ids"].append(rows.input_ids[i] + [pad_id] * pad)
        batch["labels"].append(rows.labels[i] + [IGNORE_INDEX] * pad)
        batch["position_ids"].append(rows.position_ids[i] + list(range(pad)))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def padding_fraction(rows: Rows, *, batch_size: int, fixed_length: int | None = None) -> float:
    """Share of the tokens in the batches that are padding, with batches padded to `fixed_length` or their longest."""
    real = padded = 0
    for start in range(0, len(rows), batch_size):
        lengths = [len(x) for x in rows.input_ids[start : start + batch_size]]
        real += sum(lengths)
        padded += (fixed_length or max(lengths)) * len(lengths)
    return 1 - real / padded if padded else 0.0


def target_fraction(rows: Rows, *, seq_len: int) -> float:
    """Share of a micro-batch's seq_len positions that are loss targets: what the memory planner needs."""
    targets = sum(sum(1 for label in row if label != IGNORE_INDEX) for row in rows.labels)
    return min(1.0, targets / max(len(rows) * seq_len, 1))
