import json
import pydoc_data.topics
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from lora_efficiency import sources
from lora_efficiency.data import Example, bundled_instruct
from lora_efficiency.errors import UserError
from lora_efficiency.sources import (
    KNOWN_SETS,
    alpaca_example,
    dolly_example,
    gsm8k_example,
    gsm8k_final_answer,
    guanaco_example,
    load_source,
    python_docs_texts,
    wikitext_line,
)

REAL_LOAD_DATASET = datasets.load_dataset

# A few records of each hub set in its exact schema; the last of each instruction set is one that is skipped.
ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep.\n3. Move."},
    {"instruction": "Translate the sentence to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "  ", "input": "orphan input", "output": "nothing to answer"},
]
DOLLY = [
    {
        "instruction": "Why can camels survive without water?",
        "context": "",
        "response": "Fat in their humps.",
        "category": "open_qa",
    },
    {
        "instruction": "When did Virgin Australia start?",
        "context": "Virgin Australia began on 31 August 2000.",
        "response": "31 August 2000",
        "category": "closed_qa",
    },
    {"instruction": "Name a colour.", "context": "", "response": "", "category": "brainstorming"},
]
GUANACO = [
    {
        "text": "### Human: Can you explain monopsony?### Assistant: A market with one buyer.### Human: And for a "
        "dog?### Assistant: One person buys all the treats."
    },
    {"text": "### Human:  What is 2+2? \n### Assistant:  4 \n"},
    {"text": "A record that is not a conversation."},
]
CODE_ALPACA = [
    {"instruction": "Write a function that doubles x.", "input": "", "output": "def double(x):\n    return 2 * x"},
    {"instruction": "Fix the bug.", "input": "print 'hi'", "output": "print('hi')"},
    {"instruction": "Say nothing.", "input": "", "output": None},
]
GSM8K = [
    {
        "question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72",
    },
    {"question": "Weng earns $12 an hour. How much for 100 hours?", "answer": "12*100 = 1200\n#### 1,200"},
    {"question": "", "answer": "#### 3"},
]
WIKITEXT = [
    {"text": ""},
    {"text": " = Valkyria Chronicles III = \n"},
    {"text": ""},
    {"text": " Senjō no Valkyria 3 is a tactical role @-@ playing video game . \n"},
    {"text": " The game began development in 2010 . \n"},
    {"text": ""},
    {"text": " = = Gameplay = = \n"},
    {"text": ""},
    {"text": " As with previous games , it is played in turns . \n"},
]
OFFLINE_HINT = "offline, use dataset=instruct, dataset=python-docs or a local file (.json, .jsonl, .csv, .parquet)"


@pytest.fixture(autouse=True)
def hermetic_hub(tmp_path, monkeypatch):
    """No test reaches the network or the user's caches: offline, with empty caches of its own."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def user_error(dataset: str, **fields) -> str:
    with pytest.raises(UserError) as info:
        load_source(dataset, **fields)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# Mappings, one record at a time


def test_alpaca_mapping_appends_a_nonempty_input():
    assert alpaca_example(ALPACA[0]) == Example("Give three tips for staying healthy.", ALPACA[0]["output"])
    assert alpaca_example(ALPACA[1]) == Example("Translate the sentence to French.\n\nGood morning", "Bonjour")
    assert alpaca_example(ALPACA[2]) is None


def test_dolly_mapping_labels_the_context_and_keeps_the_category():
    assert dolly_example(DOLLY[0]) == Example("Why can camels survive without water?", "Fat in their humps.", "open_qa")
    assert dolly_example(DOLLY[1]) == Example(
        "When did Virgin Australia start?\n\nContext: Virgin Australia began on 31 August 2000.",
        "31 August 2000",
        "closed_qa",
    )
    assert dolly_example(DOLLY[2]) is None


def test_guanaco_mapping_takes_the_first_turn_pair():
    assert guanaco_example(GUANACO[0]) == Example("Can you explain monopsony?", "A market with one buyer.")
    assert guanaco_example(GUANACO[1]) == Example("What is 2+2?", "4")
    assert guanaco_example(GUANACO[2]) is None
    assert guanaco_example({"text": "### Human: a question left unanswered"}) is None
    assert guanaco_example({"text": "### Human: hi### Assistant:   "}) is None


def test_code_alpaca_mapping_keeps_code_indentation():
    assert alpaca_example(CODE_ALPACA[0]).response == "def double(x):\n    return 2 * x"
    assert alpaca_example(CODE_ALPACA[1]).prompt == "Fix the bug.\n\nprint 'hi'"
    assert alpaca_example(CODE_ALPACA[2]) is None


def test_gsm8k_mapping_keeps_the_worked_answer_and_its_final_number():
    ex = gsm8k_example(GSM8K[0])
    assert ex.prompt == GSM8K[0]["question"] and ex.response == GSM8K[0]["answer"]
    assert gsm8k_final_answer(ex.response) == "72"
    assert gsm8k_final_answer(GSM8K[1]["answer"]) == "1200"
    assert gsm8k_final_answer("no marker here") == ""
    assert gsm8k_example(GSM8K[2]) is None


def test_wikitext_lines_drop_blanks_and_headings():
    assert [wikitext_line(r) for r in WIKITEXT[:5]] == [
        None,
        None,
        None,
        "Senjō no Valkyria 3 is a tactical role @-@ playing video game .",
        "The game began development in 2010 .",
    ]


# ---------------------------------------------------------------------------------------------------------
# Hub sets, through load_source with datasets.load_dataset reading a local file in the set's schema

HUB_CASES = {
    "alpaca-cleaned": (ALPACA, [alpaca_example(ALPACA[0]), alpaca_example(ALPACA[1])]),
    "dolly-15k": (DOLLY, [dolly_example(DOLLY[0]), dolly_example(DOLLY[1])]),
    "guanaco": (GUANACO, [guanaco_example(GUANACO[0]), guanaco_example(GUANACO[1])]),
    "code-alpaca": (CODE_ALPACA, [alpaca_example(CODE_ALPACA[0]), alpaca_example(CODE_ALPACA[1])]),
    "gsm8k": (GSM8K, [gsm8k_example(GSM8K[0]), gsm8k_example(GSM8K[1])]),
}


HUB_IDS = {  # (repository, configuration) as published on the Hugging Face Hub
    "alpaca-cleaned": ("yahma/alpaca-cleaned", None),
    "dolly-15k": ("databricks/databricks-dolly-15k", None),
    "guanaco": ("timdettmers/openassistant-guanaco", None),
    "code-alpaca": ("sahil2801/CodeAlpaca-20k", None),
    "gsm8k": ("openai/gsm8k", "main"),
}


def serve_from_file(monkeypatch, name: str, path: Path) -> list[tuple]:
    """datasets.load_dataset answers the hub call for `name` from `path`; returns the calls it saw."""
    calls = []

    def load_dataset(repo, config=None, *, split):
        calls.append((repo, config, split))
        return REAL_LOAD_DATASET("json", data_files=str(path), split="train")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("name", list(HUB_CASES))
def test_hub_instruction_sets_map_their_records(name, tmp_path, monkeypatch):
    records, expected = HUB_CASES[name]
    calls = serve_from_file(monkeypatch, name, write_jsonl(tmp_path / f"{name}.jsonl", records))
    source = load_source(name)
    repo, config = HUB_IDS[name]
    assert calls == [(repo, config, "train")]
    assert (source.name, source.kind, source.origin) == (name, "instruction", f"hub:{repo}")
    assert source.examples == expected and source.texts == [] and source.skipped == 1
    assert source.has_references == (name == "gsm8k")


def test_hub_wikitext_joins_lines_into_paragraphs(tmp_path, monkeypatch):
    calls = serve_from_file(monkeypatch, "wikitext-2", write_jsonl(tmp_path / "wiki.jsonl", WIKITEXT))
    source = load_source("wikitext-2")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "train")]
    assert (source.kind, source.examples, source.has_references) == ("text", [], False)
    assert source.texts == [
        "Senjō no Valkyria 3 is a tactical role @-@ playing video game .\nThe game began development in 2010 .",
        "As with previous games , it is played in turns .",
    ]


def test_hub_sets_fail_fast_and_clearly_offline():
    assert set(KNOWN_SETS) == {*sources.HUB_SETS, "instruct", "python-docs"} and len(sources.HUB_SETS) == 6
    for name in sources.HUB_SETS:
        start = time.perf_counter()
        message = user_error(name)
        assert time.perf_counter() - start < 5, name
        assert message.startswith(f"dataset={name!r} could not be downloaded from the Hugging Face Hub (")
        assert "ConnectionError" in message and message.endswith(OFFLINE_HINT)


# ---------------------------------------------------------------------------------------------------------
# Bundled sets


@pytest.mark.parametrize("name", ["instruct", ""])
def test_instruct_is_bundled_with_its_fixed_eval_split(name):
    source = load_source(name)
    train, evaluation = bundled_instruct()
    assert (source.name, source.kind, source.origin, source.has_references) == (
        "instruct",
        "instruction",
        "bundled",
        True,
    )
    assert source.examples == train and source.eval_examples == evaluation and source.texts == []


def test_python_docs_are_deterministic_passages_of_about_chunk_words(monkeypatch):
    passages = python_docs_texts(chunk_words=128)
    words = sorted(len(p.split()) for p in passages)
    assert len(passages) > 100 and words[-1] <= 128
    assert words[len(words) // 2] >= 96  # greedy packing: the median passage is nearly full
    assert python_docs_texts(chunk_words=128) == passages
    monkeypatch.setattr(pydoc_data.topics, "topics", dict(reversed(pydoc_data.topics.topics.items())))
    assert python_docs_texts(chunk_words=128) == passages  # by sorted topic key, not by the dict's order
    assert any('The "assert" statement' in p for p in passages[:5])  # sorted topic order: "assert" comes first
    assert all(len(p.split()) <= 16 for p in python_docs_texts(chunk_words=16))  # long paragraphs are cut too
    source = load_source("python-docs")
    assert (source.kind, source.examples) == ("text", []) and source.texts == python_docs_texts()
    assert source.origin.startswith("bundled:pydoc_data.topics")


# ---------------------------------------------------------------------------------------------------------
# Local files


def test_json_list_jsonl_csv_and_parquet_give_the_same_examples(tmp_path):
    records = [{"prompt": "What is 2+3?", "response": "5", "task": "arithmetic"}, {"prompt": "Hi", "response": "Hello"}]
    expected = [Example("What is 2+3?", "5", "arithmetic"), Example("Hi", "Hello")]
    (tmp_path / "list.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "lines.jsonl", records)
    write_jsonl(tmp_path / "lines.json", records)  # JSON lines under .json
    (tmp_path / "table.csv").write_text("prompt,response,task\nWhat is 2+3?,5,arithmetic\nHi,Hello,\n")
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "table.parquet"))
    for file in ("list.json", "lines.jsonl", "lines.json", "table.csv", "table.parquet"):
        source = load_source(str(tmp_path / file))
        assert source.examples == expected, file
        assert (source.name, source.kind) == (Path(file).stem, "instruction")
        assert source.origin == f"file:{(tmp_path / file).resolve()}" and not source.has_references


@pytest.mark.parametrize("name", ["alpaca-cleaned", "dolly-15k", "guanaco", "gsm8k"])
def test_local_files_in_a_hub_schema_are_recognised(name, tmp_path):
    records, expected = HUB_CASES[name]
    source = load_source(str(write_jsonl(tmp_path / "mine.jsonl", records)))
    assert (source.examples, source.skipped, source.has_references) == (expected, 1, name == "gsm8k")


def test_local_text_file_is_plain_text_and_csv_numbers_become_strings(tmp_path):
    texts = write_jsonl(tmp_path / "notes.jsonl", [{"text": "First note."}, {"text": ""}, {"text": " Second. "}])
    source = load_source(str(texts))
    assert (source.kind, source.texts, source.skipped) == ("text", ["First note.", "Second."], 1)
    (tmp_path / "sums.csv").write_text("question,answer\nWhat is 2+3?,5\nWhat is 1+1?,2\n")
    source = load_source(str(tmp_path / "sums.csv"))
    assert source.examples == [Example("What is 2+3?", "5"), Example("What is 1+1?", "2")]
    assert not source.has_references  # no "#### n": the answers are not GSM8K's worked form


def test_explicit_fields(tmp_path):
    path = str(tmp_path / "a.csv")
    Path(path).write_text("id,question_text,reply,body\n1,Why?,Because.,Some text.\n2,How?,,More text.\n")
    source = load_source(path, prompt_field="question_text", response_field="reply")
    assert (source.examples, source.skipped) == ([Example("Why?", "Because.")], 1)
    assert load_source(path, text_field="body").texts == ["Some text.", "More text."]
    message = user_error(path, prompt_field="question", response_field="reply")
    assert message == f"dataset={path!r}: no column prompt_field='question': found id, question_text, reply, body"
    message = user_error(path, text_field="content")
    assert "no column text_field='content': found id, question_text, reply, body" in message
    assert "name both columns, or neither" in user_error(path, prompt_field="question_text")
    assert "apply to local files" in user_error("instruct", text_field="body")


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line that says what is wrong and what is allowed


def test_missing_columns_name_what_was_found(tmp_path):
    path = str(tmp_path / "a.csv")
    Path(path).write_text("id,question_text\n1,Why?\n")
    message = user_error(path)
    assert message.startswith(
        f"dataset={path!r}: no prompt/response columns: found id, question_text; name them with prompt_field and "
        "response_field, or text_field"
    )


def test_unknown_names_missing_files_and_other_suffixes(tmp_path):
    message = user_error("dolly")
    assert message.startswith("dataset='dolly' is not a known data set: known are alpaca-cleaned, dolly-15k,")
    assert all(name in message for name in KNOWN_SETS) and ".parquet" in message
    missing = str(tmp_path / "nope.jsonl")
    assert user_error(missing).startswith(f"dataset={missing!r}: no such file; allowed are a local file (.json,")
    (tmp_path / "notes.txt").write_text("hello\n")
    message = user_error(str(tmp_path / "notes.txt"))
    assert "a .txt file is not read; allowed are a local file (.json, .jsonl, .csv, .parquet)" in message
    assert "is a folder, not a file" in user_error(str(tmp_path))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_files_say_so(suffix, tmp_path):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\xff\xfe" + "prompt,response\nhi,there\n".encode("utf-16-le"))
    assert "the file is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8" in user_error(str(bad))
    late = tmp_path / f"late{suffix}"  # valid for 100 records, then Latin-1
    if suffix == ".csv":
        late.write_bytes(b"prompt,response\n" + b"hi,there\n" * 100 + b"caf\xe9,x\n")
    else:
        late.write_bytes(b'{"prompt": "hi", "response": "there"}\n' * 100 + b'{"prompt": "caf\xe9", "response": "x"}\n')
    assert "the file is not UTF-8 text (byte 0xe9 at offset" in user_error(str(late))


def test_empty_files_say_so(tmp_path):
    cases = {"empty.jsonl": "", "empty.csv": "", "blank.jsonl": "\n \n", "list.json": "[]", "header.csv": "a,b\n"}
    for file, content in cases.items():
        (tmp_path / file).write_text(content)
        message = user_error(str(tmp_path / file))
        assert message.endswith(("the file is empty", "the file holds no records")), file
    write_jsonl(tmp_path / "hollow.jsonl", [{"prompt": "", "response": "x"}, {"prompt": "y", "response": None}])
    assert user_error(str(tmp_path / "hollow.jsonl")).endswith("all 2 records have an empty prompt or response")


def test_malformed_files_name_the_format(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "hi"\n')
    assert "line 1 is not JSON (Expecting ',' delimiter, column 16)" in user_error(str(tmp_path / "broken.jsonl"))
    (tmp_path / "broken.parquet").write_text("not parquet")
    assert "could not be read as PARQUET (ArrowInvalid:" in user_error(str(tmp_path / "broken.parquet"))
