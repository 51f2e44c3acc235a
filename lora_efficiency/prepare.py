"""Prepared data folders: a source formatted and tokenized once, cached by its inputs, with a manifest.

A folder holds `train/` and `eval/` (Arrow, `datasets.Dataset.save_to_disk`: input_ids, labels and the raw
prompt/response/task, which evaluation needs for exact match) and `manifest.json` (counts, token-length
statistics, truncation, padding with and without packing, template, tokenizer, seed, content fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import datasets
import mlflow
from datasets import Dataset, load_from_disk

from lora_efficiency import data as D
from lora_efficiency.cli import remove_leftovers, temp_sibling
from lora_efficiency.config import is_run_id
from lora_efficiency.errors import UserError
from lora_efficiency.models import ModelSource, cache_root
from lora_efficiency.names import BUNDLED_DATA
from lora_efficiency.sources import load_source

FORMAT_VERSION = 1  # bump when the folder layout or the tokenization rules change: old caches are not reused
TEMP_PREFIX = ".prepare-"  # a folder being written: its owner follows (cli.temp_sibling), then it is renamed
STATS_BATCH_SIZE = 4  # batch size at which the manifest reports padding fractions (the train default)


@dataclass
class Prepared:
    path: Path
    manifest: dict
    train: D.TokenizedSplit
    eval: D.TokenizedSplit
    eval_examples: list[D.Example]  # raw prompt/response/task of each eval row, in the same order
    cached: bool = False
    eval_balanced: bool = False  # eval rows in D.balanced_order (the split has task families), not stored order


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(*, dataset: str, tokenizer, model: ModelSource, settings: dict) -> str:
    """Everything that changes the tokenized rows: the source (a local file by its content), the tokenizer and
    its chat template, and the settings. Hub sets are keyed by name; their manifest records the content."""
    local = Path(dataset)
    source = f"file:{_file_digest(local)}" if dataset and local.is_file() else f"name:{dataset or BUNDLED_DATA}"
    parts = {
        "format": FORMAT_VERSION,
        "source": source,
        "tokenizer": f"{model.model_id}@{model.revision}",
        "vocab": len(tokenizer),
        "template": hashlib.sha256((tokenizer.chat_template or "alpaca").encode()).hexdigest(),
        **settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _length_stats(split: D.TokenizedSplit) -> dict:
    lengths = sorted(len(x) for x in split.input_ids)
    targets = [sum(y != D.IGNORE_INDEX for y in labels) for labels in split.labels]
    if not lengths:
        return {"count": 0}
    return {
        "count": len(lengths),
        "tokens": sum(lengths),
        "target_tokens": sum(targets),
        "min": lengths[0],
        "median": statistics.median(lengths),
        "mean": round(statistics.fmean(lengths), 2),
        "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max": lengths[-1],
        "truncated": split.num_truncated,
    }


def _split(source, *, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deduplicate, then a seeded shuffle and split: no record can be in both splits."""
    if source.kind == "text":
        records = list(dict.fromkeys(t for t in source.texts if t.strip()))
    else:
        records = list(dict.fromkeys(source.examples))
    if getattr(source, "eval_examples", None):  # the bundled set ships its own fixed split
        held_out = list(dict.fromkeys(source.eval_examples))
        seen = set(held_out)
        return [r for r in records if r not in seen], held_out
    rng = random.Random(seed)
    rng.shuffle(records)
    n_eval = max(1, round(eval_fraction * len(records))) if len(records) > 1 else 0
    return records[n_eval:], records[:n_eval]


def _tokenize(tokenizer, kind: str, records: list, *, seq_len: int, train_on_prompt: bool) -> D.TokenizedSplit:
    if kind == "text":
        return D.tokenize_texts(tokenizer, records, seq_len=seq_len)
    return D.tokenize(tokenizer, records, seq_len=seq_len, train_on_prompt=train_on_prompt)


def prepare_data(
    *,
    dataset: str,
    model: ModelSource,
    tokenizer,
    seq_len: int,
    num_samples: int = 0,
    eval_fraction: float = 0.1,
    seed: int = 0,
    train_on_prompt: bool = False,
    prompt_field: str = "",
    response_field: str = "",
    text_field: str = "",
) -> Prepared:
    """Format and tokenize `dataset` for `model`'s tokenizer, or reuse the cached folder for the same inputs.

    num_samples caps the training examples (0: all); eval takes eval_fraction of the deduplicated records
    (the bundled `instruct` set keeps its own fixed 300-example eval split). Rows longer than seq_len are
    truncated and counted.
    """
    datasets.disable_progress_bars()
    settings = {
        "seq_len": seq_len,
        "num_samples": num_samples,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "train_on_prompt": train_on_prompt,
        "prompt_field": prompt_field,
        "response_field": response_field,
        "text_field": text_field,
    }
    key = cache_key(dataset=dataset, tokenizer=tokenizer, model=model, settings=settings)
    is_file = bool(dataset) and Path(dataset).is_file()
    # cut to 100 characters: a file's stem may be 250, and the folder's name (stem-key) must stay under NAME_MAX
    name = re.sub(r"[^\w.-]", "_", Path(dataset).stem if is_file else dataset or BUNDLED_DATA)[:100]
    folder = cache_root() / "data" / f"{name}-{key}"
    remove_leftovers(folder.parent, TEMP_PREFIX)  # every prepare, a cached one too: a killed one's half folder
    if (folder / "manifest.json").exists():
        prepared = load_prepared(folder)
        prepared.cached = True
        return prepared

    source = load_source(
        dataset or BUNDLED_DATA, prompt_field=prompt_field, response_field=response_field, text_field=text_field
    )
    train_records, eval_records = _split(source, eval_fraction=eval_fraction, seed=seed)
    warnings = []
    if num_samples and num_samples > len(train_records):
        warnings.append(
            f"num_samples={num_samples} but {source.name!r} has {len(train_records)} training "
            f"examples after deduplication and the eval split: using all {len(train_records)}"
        )
    elif num_samples:
        train_records = train_records[:num_samples]
    if not train_records or not eval_records:
        raise UserError(
            f"dataset={dataset!r}: {len(train_records) + len(eval_records)} usable record(s) after "
            "deduplication; need at least 2 (one to train on, one to evaluate)"
        )
    train = _tokenize(tokenizer, source.kind, train_records, seq_len=seq_len, train_on_prompt=train_on_prompt)
    evaluation = _tokenize(tokenizer, source.kind, eval_records, seq_len=seq_len, train_on_prompt=False)

    manifest = _manifest(
        source, tokenizer, model, train, evaluation, key=key, settings=settings, warnings=warnings, seq_len=seq_len
    )
    _write_atomically(folder, manifest, train, train_records, evaluation, eval_records, kind=source.kind)
    return load_prepared(folder)


def _manifest(source, tokenizer, model: ModelSource, train, evaluation, *, key, settings, warnings, seq_len) -> dict:
    """What a prepared folder holds: counts, token-length statistics, padding with and without packing, template,
    tokenizer, settings and the content fingerprint."""
    packed = D.pack(train, seq_len=seq_len)
    return {
        "format_version": FORMAT_VERSION,
        "dataset": source.name,
        "origin": source.origin,
        "kind": source.kind,
        "has_references": source.has_references,
        "answer_kinds": source.answer_kinds,
        "template": "none (plain text)"
        if source.kind == "text"
        else ("chat template of the tokenizer" if tokenizer.chat_template else "alpaca"),
        "tokenizer": f"{model.model_id}@{model.revision}",
        "cache_key": key,
        "fingerprint": D.fingerprint(train, evaluation),
        "settings": settings,
        "long_rows": "truncated to seq_len",
        "skipped_records": getattr(source, "skipped", 0),
        "warnings": warnings,
        "train": _length_stats(train),
        "eval": _length_stats(evaluation),
        "packing": {
            "batch_size": STATS_BATCH_SIZE,
            "rows_packed": len(packed),
            "padding_fraction_packed": round(
                D.padding_fraction(packed, batch_size=STATS_BATCH_SIZE, fixed_length=seq_len), 4
            ),
            "padding_fraction_unpacked": round(D.padding_fraction(D.unpacked(train), batch_size=STATS_BATCH_SIZE), 4),
        },
    }


def _write_atomically(folder: Path, manifest: dict, train, train_records, evaluation, eval_records, *, kind) -> None:
    """Write into a temporary sibling, then rename: a reader never sees half a folder."""
    tmp = temp_sibling(folder.parent, TEMP_PREFIX)
    _to_dataset(Dataset, train, train_records, kind).save_to_disk(str(tmp / "train"))
    _to_dataset(Dataset, evaluation, eval_records, kind).save_to_disk(str(tmp / "eval"))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        tmp.rename(folder)
    except OSError:  # prepared concurrently by another process: theirs is identical, keep it
        shutil.rmtree(tmp, ignore_errors=True)


def _to_dataset(dataset_cls, split: D.TokenizedSplit, records: list, kind: str):
    if kind == "text":
        prompts, responses, tasks = [""] * len(records), list(records), ["text"] * len(records)
    else:
        prompts, responses, tasks = (
            [r.prompt for r in records],
            [r.response for r in records],
            [r.task for r in records],
        )
    return dataset_cls.from_dict(
        {"input_ids": split.input_ids, "labels": split.labels, "prompt": prompts, "response": responses, "task": tasks}
    )


def load_prepared(folder: str | Path) -> Prepared:
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"data={str(folder)!r} is not a prepared data folder (manifest.json: {exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"data={str(folder)!r} was prepared by format {manifest.get('format_version')}, this "
            f"version reads format {FORMAT_VERSION}: run prepare again"
        )

    splits = {}
    for name in ("train", "eval"):
        try:
            ds = load_from_disk(str(folder / name))
            splits[name] = (ds, D.TokenizedSplit(ds["input_ids"], ds["labels"], manifest[name].get("truncated", 0)))
        except (OSError, ValueError, KeyError) as exc:  # a split missing, truncated or without its columns
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            raise UserError(
                f"data={str(folder)!r}: its {name} split cannot be read ({why}): run prepare again"
            ) from None
    eval_ds = splits["eval"][0]
    eval_examples = [
        D.Example(p, r, t) for p, r, t in zip(eval_ds["prompt"], eval_ds["response"], eval_ds["task"], strict=True)
    ]
    # Every consumer takes a prefix (the final evaluation's eval_samples) or a suffix (the validation curve's
    # val_samples) of the eval split: in balanced order both are balanced over task families. Ordered here, on
    # reading, so folders prepared before are read the same way and their fingerprint is unchanged.
    order = D.balanced_order([e.task for e in eval_examples])
    held_out = splits["eval"][1]
    held_out = D.TokenizedSplit(
        [held_out.input_ids[i] for i in order], [held_out.labels[i] for i in order], held_out.num_truncated
    )
    eval_examples = [eval_examples[i] for i in order]
    balanced = order != list(range(len(order)))
    return Prepared(folder, manifest, splits["train"][1], held_out, eval_examples, eval_balanced=balanced)


def resolve_data(data: str, *, model: ModelSource, tokenizer, seq_len: int, train_on_prompt: bool = False) -> Prepared:
    """What `train -P data=` accepts: a prepared folder, the run id of a `prepare` run, or anything prepare takes
    (empty for the bundled instruction set, a set name, a local file), prepared on the fly through the cache."""
    if is_run_id(data):
        data = _prepared_path_of_run(data)
    if data and Path(data).is_dir():  # Path("") is "."
        prepared = load_prepared(data)
        expected = f"{model.model_id}@{model.revision}"
        if prepared.manifest["tokenizer"] != expected:
            raise UserError(
                f"data={data!r} was tokenized for {prepared.manifest['tokenizer']}, not for the model "
                f"{expected}: prepare it for this model"
            )
        if prepared.manifest["settings"]["seq_len"] > seq_len:
            raise UserError(
                f"data={data!r} was prepared with seq_len={prepared.manifest['settings']['seq_len']}, "
                f"longer than seq_len={seq_len}: prepare it again or raise seq_len"
            )
        return prepared
    return prepare_data(
        dataset=data, model=model, tokenizer=tokenizer, seq_len=seq_len, train_on_prompt=train_on_prompt
    )


def _prepared_path_of_run(run_id: str) -> str:
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:
        raise UserError(f"data={run_id!r} looks like a run id but no such run is in the tracking store") from None
    path = run.data.tags.get("prepared_path")
    if not path:
        raise UserError(f"data={run_id!r} is a run without a prepared_path tag: pass a prepare run's id")
    if not Path(path).is_dir():
        raise UserError(f"data={run_id!r}: its prepared folder {path} is not on this machine: run prepare again")
    return path
