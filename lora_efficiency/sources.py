"""Data sources: a data set name or a local file -> raw records (prompt/response pairs or plain text), untokenized.

load_source("dolly-15k")          # a Hugging Face Hub set, through datasets.load_dataset
load_source("instruct")           # the bundled generated set, offline, with its fixed eval split
load_source("python-docs")        # the Python reference shipped with CPython, offline, plain text
load_source("my_data.jsonl")      # a local .json, .jsonl, .csv or .parquet file; its schema found by its columns
"""

from __future__ import annotations

import csv
import json
import platform
import pydoc_data.topics
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from lora_efficiency.data import Example, bundled_instruct
from lora_efficiency.errors import ConfigError, UserError, invalid, shown
from lora_efficiency.inputs import path_kind
from lora_efficiency.names import BUNDLED_DATA, KNOWN_SETS, PYTHON_DOCS

INSTRUCTION = "instruction"  # prompt/response pairs
TEXT = "text"  # plain text for causal-LM perplexity
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix -> loader
_FILES = "a local file (.json, .jsonl, .csv, .parquet)"

# How a generated answer is compared with its reference (lora_efficiency.evaluation.answers_match): as text
# normalised, as one number, as a JSON value, or as GSM8K's final number after "####". Each source declares the
# kind of its references, per task family where it has families ("" is every other task).
STRING, NUMBER, JSON, GSM8K = "string", "number", "json", "gsm8k"
ANSWER_KINDS = (STRING, NUMBER, JSON, GSM8K)
BUNDLED_ANSWER_KINDS = {
    "arithmetic": NUMBER,
    "unit_conversion": NUMBER,
    "date_format": STRING,
    "sorting": STRING,
    "string": STRING,  # reversed, capitalised, initials and letter counts: compared as text ("3" is still "3")
    "json_extraction": JSON,
}


@dataclass(frozen=True)
class Source:
    name: str  # "alpaca-cleaned", "instruct", "python-docs", or the file's stem
    kind: str  # INSTRUCTION or TEXT
    examples: list[Example]  # kind == INSTRUCTION
    texts: list[str]  # kind == TEXT
    origin: str  # "hub:yahma/alpaca-cleaned", "bundled", "file:/abs/path.jsonl"
    has_references: bool  # responses are exact answers, fit for exact-match scoring
    eval_examples: list[Example] = field(default_factory=list)  # a fixed eval split; only `instruct` ships one
    answer_kinds: dict[str, str] = field(default_factory=lambda: {"": STRING})  # task family -> kind ("": others)
    skipped: int = 0  # records dropped for an empty prompt, response or text, or a text that does not parse


# ---------------------------------------------------------------------------------------------------------
# Schema mappings: one record (a dict with the set's own columns) -> an Example, a text, or None to skip it.


def _clean(value: object) -> str:
    return "" if value is None else str(value).strip()


def _example(prompt: str, response: str, task: str = "") -> Example | None:
    return Example(prompt, response, task) if prompt and response else None


def alpaca_example(record: dict) -> Example | None:
    """yahma/alpaca-cleaned and sahil2801/CodeAlpaca-20k: instruction, input (often empty), output."""
    instruction, context = _clean(record["instruction"]), _clean(record["input"])
    prompt = f"{instruction}\n\n{context}" if instruction and context else instruction
    return _example(prompt, _clean(record["output"]))


def dolly_example(record: dict) -> Example | None:
    """databricks/databricks-dolly-15k: instruction, context (often empty), response, category."""
    instruction, context = _clean(record["instruction"]), _clean(record["context"])
    prompt = f"{instruction}\n\nContext: {context}" if instruction and context else instruction
    return _example(prompt, _clean(record["response"]), _clean(record.get("category")))


_GUANACO_TURNS = re.compile(r"### Human:(.*?)### Assistant:(.*?)(?=### Human:|$)", re.DOTALL)


def guanaco_example(record: dict) -> Example | None:
    """timdettmers/openassistant-guanaco: one `text` of "### Human: ... ### Assistant: ..." turns; the first pair."""
    turns = _GUANACO_TURNS.search(_clean(record["text"]))
    return _example(turns[1].strip(), turns[2].strip()) if turns else None


def gsm8k_example(record: dict) -> Example | None:
    """openai/gsm8k: question, answer = the worked solution ending in "#### <number>"; the whole answer is the
    response, so the model learns to reason before it answers."""
    return _example(_clean(record["question"]), _clean(record["answer"]))


def gsm8k_final_answer(text: str) -> str:
    """The reference of a GSM8K answer: the number after its last "####", without separators ("1,200" -> "1200")."""
    _, marker, tail = text.rpartition("####")
    return tail.strip().replace(",", "") if marker else ""


def prompt_response_example(record: dict) -> Example | None:
    return _example(_clean(record["prompt"]), _clean(record["response"]), _clean(record.get("task")))


def wikitext_line(record: dict) -> str | None:
    """Salesforce/wikitext: one line of an article; None for the blank lines and the " = Heading = " lines."""
    line = _clean(record["text"])
    return None if not line or (line.startswith("=") and line.endswith("=")) else line


def _paragraphs(lines: Iterable[str | None]) -> list[str]:
    """Consecutive lines joined into one passage; a None (blank line or heading) ends it."""
    passages, current = [], []
    for line in [*lines, None]:
        if line is not None:
            current.append(line)
        elif current:
            passages.append("\n".join(current))
            current = []
    return passages


# ---------------------------------------------------------------------------------------------------------
# Hub sets


@dataclass(frozen=True)
class HubSet:
    path: str  # repository on the Hugging Face Hub
    config: str | None  # the set's configuration name, where it has several
    kind: str
    to_record: Callable[[dict], Example | str | None]  # TEXT sets map a line; consecutive lines form a passage
    has_references: bool = False
    answer_kind: str = STRING
    split: str = "train"


HUB_SETS = {
    "alpaca-cleaned": HubSet("yahma/alpaca-cleaned", None, INSTRUCTION, alpaca_example),
    "dolly-15k": HubSet("databricks/databricks-dolly-15k", None, INSTRUCTION, dolly_example),
    "guanaco": HubSet("timdettmers/openassistant-guanaco", None, INSTRUCTION, guanaco_example),
    "code-alpaca": HubSet("sahil2801/CodeAlpaca-20k", None, INSTRUCTION, alpaca_example),
    "gsm8k": HubSet("openai/gsm8k", "main", INSTRUCTION, gsm8k_example, has_references=True, answer_kind=GSM8K),
    "wikitext-2": HubSet("Salesforce/wikitext", "wikitext-2-raw-v1", TEXT, wikitext_line),
}


def _load_hub(name: str) -> Source:
    spec = HUB_SETS[name]
    try:
        table = datasets.load_dataset(spec.path, spec.config, split=spec.split)
    except Exception as exc:  # offline, gated, moved, rate limited: every case leaves the user the same choices
        raise UserError(
            f"dataset={name!r} could not be downloaded from the Hugging Face Hub ({_reason(exc)}); offline, use "
            f"dataset={BUNDLED_DATA}, dataset={PYTHON_DOCS} or {_FILES}"
        ) from exc
    records = table.to_list()
    if spec.kind == TEXT:
        return Source(name, TEXT, [], _paragraphs(map(spec.to_record, records)), f"hub:{spec.path}", False)
    examples = [ex for ex in map(spec.to_record, records) if ex is not None]
    return Source(
        name,
        INSTRUCTION,
        examples,
        [],
        f"hub:{spec.path}",
        spec.has_references,
        skipped=len(records) - len(examples),
        answer_kinds={"": spec.answer_kind},
    )


def _reason(exc: BaseException) -> str:
    """`Type: message` of the innermost cause, on one line: datasets wraps what went wrong in its own errors."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message[:200]}" if message else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# Bundled, offline


def python_docs_texts(chunk_words: int = 256) -> list[str]:
    """Passages of at most `chunk_words` words from the Python reference that ships with CPython (pydoc_data).

    The topics' paragraphs, in sorted topic order, are packed greedily into passages; a paragraph longer than
    chunk_words is cut at line ends (a line longer than that, at words). Python 3.11's 79 topics hold ~65k
    words: ~300 passages of 256. The text, hence the passages, changes only with the Python version.
    """
    if chunk_words < 1:
        raise ConfigError([invalid("chunk_words", chunk_words, "at least 1")])

    passages, current, words = [], [], 0
    topics = pydoc_data.topics.topics  # read when called: a test reorders it
    for key in sorted(topics):
        for paragraph in re.split(r"\n[ \t]*\n", topics[key]):
            for piece in _pieces(paragraph.strip("\n"), chunk_words):
                n = len(piece.split())
                if current and words + n > chunk_words:
                    passages.append("\n\n".join(current))
                    current, words = [], 0
                current.append(piece)
                words += n
    if current:
        passages.append("\n\n".join(current))
    return passages


def _pieces(paragraph: str, limit: int) -> list[str]:
    """The paragraph, or, when longer than `limit` words, runs of its lines of at most `limit` words."""
    if not paragraph.strip():
        return []
    if len(paragraph.split()) <= limit:
        return [paragraph]
    pieces, current, words = [], [], 0
    for line in paragraph.splitlines():
        line_words = line.split()
        if len(line_words) > limit:  # only tables and code have lines this long, and only for a small limit
            chunks = [" ".join(line_words[i : i + limit]) for i in range(0, len(line_words), limit)]
        else:
            chunks = [line]
        for chunk in chunks:
            n = len(chunk.split())
            if current and words + n > limit:
                pieces.append("\n".join(current))
                current, words = [], 0
            current.append(chunk)
            words += n
    if current:
        pieces.append("\n".join(current))
    return pieces


# ---------------------------------------------------------------------------------------------------------
# Local files

_FILE_SCHEMAS = (  # the columns a file must have -> its mapping, tried in this order
    (("instruction", "input", "output"), alpaca_example),
    (("instruction", "context", "response"), dolly_example),
    (("question", "answer"), gsm8k_example),
    (("prompt", "response"), prompt_response_example),
)


class NotText(Exception):
    """A field a mapping reads holds a number, list or object, not text."""

    def __init__(self, column: str, value: object):
        self.column, self.value = column, value
        super().__init__(column)


class _TextRecord(dict):
    """One record of a file as the mappings see it: a missing column reads as None (as datasets fills it), and a
    field that is not text raises NotText: str() of a dict would train on "{'name': ...}" without a word."""

    def __init__(self, record: dict, at: str):
        super().__init__(record)
        self.at = at  # "line 7" (JSON) or "row 7" (CSV, parquet), 1-based, for error messages

    def __getitem__(self, column):
        value = self.get(column)
        if value is not None and not isinstance(value, str):
            raise NotText(column, value)
        return value


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice in one record is an error (json keeps the last one silently)."""
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def _json_records(path: Path, dataset: str) -> tuple[list[dict], list[str]]:
    """(records, where each is: "line 3" or "record 3") of a .json (a list of objects) or .jsonl (one object a
    line) file. Hand-written, not datasets' JSON loader: pyarrow's reader crashed the process (exit 139, no
    message) on a file holding `null`, and names no line of a broken one."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise UserError(f"dataset={dataset!r}: the file is empty")
    try:
        whole = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except (_DuplicateKey, json.JSONDecodeError) as exc:
        if text.lstrip().startswith("["):  # one JSON document: its own position
            if isinstance(exc, _DuplicateKey):
                raise UserError(f"dataset={dataset!r}: a record gives the key {exc.args[0]!r} twice") from None
            raise UserError(
                f"dataset={dataset!r}: not JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})"
            ) from None
        parsed = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    parsed.append((json.loads(line, object_pairs_hook=_refuse_duplicates), f"line {number}"))
                except _DuplicateKey as exc:
                    raise UserError(f"dataset={dataset!r}: line {number} gives the key {exc.args[0]!r} twice") from None
                except json.JSONDecodeError as exc:
                    raise UserError(
                        f"dataset={dataset!r}: line {number} is not JSON ({exc.msg}, column {exc.colno})"
                    ) from None
    else:
        if not isinstance(whole, list):
            whole = [whole]
        parsed = [(record, f"record {n}") for n, record in enumerate(whole, 1)]
    for record, where in parsed:
        if not isinstance(record, dict):
            raise UserError(
                f"dataset={dataset!r}: {where} holds {type(record).__name__ if record is not None else 'null'}"
                ', not an object: a record is an object of text fields, such as {"prompt": ..., "response": ...}'
            )
    return [r for r, _ in parsed], [n for _, n in parsed]


def _csv_as_text(path: Path) -> dict:
    """load_dataset arguments that keep every CSV cell text: pandas' guess turns "007" into 7 and "NA" into null."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), [])
    features = datasets.Features({name: datasets.Value("string") for name in header}) if header else None
    return {"features": features, "keep_default_na": False}


def _read_file(path: Path, dataset: str) -> tuple[list[_TextRecord], list[str]]:
    """(records, column names) of a local file; each record knows its line (JSON) or row (CSV, parquet)."""
    loader = FILE_FORMATS[path.suffix.lower()]
    try:
        if loader == "json":
            records, places = _json_records(path, dataset)
            columns = list(dict.fromkeys(k for r in records for k in r))
        else:
            extra = _csv_as_text(path) if loader == "csv" else {}
            table = datasets.load_dataset(loader, data_files=str(path), split="train", **extra)
            records, columns = table.to_list(), table.column_names
            places = [f"row {n}" for n in range(1, len(records) + 1)]
    except UserError:
        raise
    except Exception as exc:  # datasets raises something different for each way a file is bad: ask the file
        raise UserError(f"dataset={dataset!r}: {_why_unreadable(path, loader, exc)}") from exc
    if not records:
        raise UserError(f"dataset={dataset!r}: the file holds no records")
    return [_TextRecord(r, at) for r, at in zip(records, places, strict=True)], columns


def _why_unreadable(path: Path, loader: str, exc: Exception) -> str:
    # Not UTF-8 reaches us as UnicodeDecodeError, ArrowInvalid "JSON parse error: Invalid value" or ValueError
    # "Invalid octet", bare or wrapped in a DatasetGenerationError; an empty file as StopIteration (.jsonl),
    # EmptyDataError (.csv) or ValueError "corresponds to no data" (blank lines, `[]`, a CSV header alone).
    if loader != "parquet":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as bad:
            return f"the file is not UTF-8 text (byte 0x{raw[bad.start]:02x} at offset {bad.start}); save it as UTF-8"
        if not text.strip():
            return "the file is empty"
    if isinstance(exc, ValueError) and "corresponds to no data" in str(exc):
        return "the file holds no records"
    return f"could not be read as {loader.upper()} ({_reason(exc)})"


def _file_mapping(
    columns: list[str], records: list[dict], dataset: str, prompt_field: str, response_field: str, text_field: str
) -> tuple[str, Callable[[dict], Example | str | None]]:
    """(kind, mapping) of a file: the columns named by the user, else the first known schema its columns hold."""
    found = ", ".join(columns)
    if prompt_field or text_field:
        named = {"prompt_field": prompt_field, "response_field": response_field, "text_field": text_field}
        absent = [f"{arg}={col!r}" for arg, col in named.items() if col and col not in columns]
        if absent:
            raise UserError(f"dataset={dataset!r}: no column {' or '.join(absent)}: found {found}")
        if text_field:
            return TEXT, lambda r: _clean(r[text_field]) or None
        return INSTRUCTION, lambda r: _example(_clean(r[prompt_field]), _clean(r[response_field]))
    for needed, mapping in _FILE_SCHEMAS:
        if set(needed) <= set(columns):
            return INSTRUCTION, mapping
    if "text" in columns:
        first = next((r for r in records if isinstance(r.get("text"), str) and r["text"].strip()), None)
        if first is not None and guanaco_example(first) is not None:
            return INSTRUCTION, guanaco_example
        return TEXT, lambda r: _clean(r["text"]) or None
    raise UserError(
        f"dataset={dataset!r}: no prompt/response columns: found {found}; name them with prompt_field and "
        "response_field, or text_field (columns read without naming: instruction/input/output, "
        "instruction/context/response, question/answer, prompt/response, text)"
    )


def _load_file(path: Path, dataset: str, prompt_field: str, response_field: str, text_field: str) -> Source:
    records, columns = _read_file(path, dataset)
    record = records[0]
    try:
        kind, mapping = _file_mapping(columns, records, dataset, prompt_field, response_field, text_field)
        mapped = []
        for record in records:
            if (x := mapping(record)) is not None:
                mapped.append(x)
    except NotText as bad:
        raise UserError(
            f"dataset={dataset!r}: {record.at}, column {bad.column!r} holds {type(bad.value).__name__} "
            f"{shown(bad.value, 60)}, not text: every record's fields must be strings (quote numbers)"
        ) from None
    if not mapped:
        empty = "text" if kind == TEXT else "prompt or response"
        raise UserError(f"dataset={dataset!r}: all {len(records)} records have an empty {empty}")
    origin, skipped = f"file:{path.resolve()}", len(records) - len(mapped)
    if kind == TEXT:
        return Source(path.stem, TEXT, [], mapped, origin, False, skipped=skipped)
    # Worked answers ending in "#### n" (GSM8K's form) are scored by that number; other responses are free text.
    has_references = mapping is gsm8k_example and all(gsm8k_final_answer(ex.response) for ex in mapped)
    kinds = {"": GSM8K if has_references else STRING}
    return Source(path.stem, INSTRUCTION, mapped, [], origin, has_references, skipped=skipped, answer_kinds=kinds)


# ---------------------------------------------------------------------------------------------------------


def load_source(dataset: str, *, prompt_field: str = "", response_field: str = "", text_field: str = "") -> Source:
    """The records of `dataset`: a name in KNOWN_SETS ("" is the bundled `instruct`) or a local file path.

    A file's schema is found from its columns, or named: prompt_field and response_field (prompt/response
    pairs), or text_field (plain text). Records with an empty prompt, response or text are skipped and counted.
    """
    name = dataset or BUNDLED_DATA
    path = Path(dataset).expanduser()
    is_file = name not in KNOWN_SETS and path.is_file()
    problems = []
    if (prompt_field or response_field or text_field) and not is_file:
        problems.append(invalid("dataset", dataset, "prompt_field, response_field and text_field apply to local files"))
    if bool(prompt_field) != bool(response_field):
        problems.append(
            f"prompt_field={prompt_field!r}, response_field={response_field!r}: name both columns, or neither"
        )
    if text_field and (prompt_field or response_field):
        problems.append(invalid("text_field", text_field, "name prompt_field and response_field, or text_field"))
    if problems:
        raise ConfigError(problems)

    if name == BUNDLED_DATA:
        train, evaluation = bundled_instruct()
        kinds = dict(BUNDLED_ANSWER_KINDS)
        return Source(
            BUNDLED_DATA, INSTRUCTION, train, [], "bundled", True, eval_examples=evaluation, answer_kinds=kinds
        )
    if name == PYTHON_DOCS:
        origin = f"bundled:pydoc_data.topics@python-{platform.python_version()}"
        return Source(PYTHON_DOCS, TEXT, [], python_docs_texts(), origin, False)
    if name in HUB_SETS:
        return _load_hub(name)
    allowed = f"allowed are {_FILES} or one of {', '.join(KNOWN_SETS)}"
    if is_file and path.suffix.lower() not in FILE_FORMATS:
        raise UserError(f"dataset={dataset!r}: a {path.suffix or 'suffix-less'} file is not read; {allowed}")
    if is_file:
        return _load_file(path, dataset, prompt_field, response_field, text_field)
    if kind := path_kind(path):  # a folder, a FIFO, a device: named as what it is
        raise UserError(f"dataset={shown(dataset)} is {kind}, not a file; {allowed}")
    if path.suffix or len(path.parts) > 1:  # it names a file
        raise UserError(f"dataset={dataset!r}: no such file; {allowed}")
    raise UserError(f"dataset={dataset!r} is not a known data set: known are {', '.join(KNOWN_SETS)}, or {_FILES}")


def answer_kinds(manifest: dict) -> dict[str, str]:
    """The answer kinds of a prepared folder: its manifest's, or, for folders prepared before manifests recorded
    them, what their source declares today (a file's references are GSM8K's exactly when it has references)."""
    if "answer_kinds" in manifest:
        return manifest["answer_kinds"]
    name = manifest.get("dataset", "")
    if name == BUNDLED_DATA:
        return dict(BUNDLED_ANSWER_KINDS)
    if name in HUB_SETS and str(manifest.get("origin", "")).startswith("hub:"):
        return {"": HUB_SETS[name].answer_kind}
    return {"": GSM8K if manifest.get("has_references") else STRING}
