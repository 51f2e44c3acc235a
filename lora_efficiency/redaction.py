"""Secrets never reach the tracking store, the terminal, a log file or an error tag."""

from __future__ import annotations

import os
import re

# Secrets never reach a terminal, a log file or an error tag: the values of these variables, of every variable whose
# name says it holds a secret (SECRET_NAME), a URI's password (`scheme://user:password@host`), and anything shaped
# like a Hugging Face, OpenAI or GitHub token are replaced by `***` (`<prefix>***` for a token) in every `error:`
# line, log record, error tag, description and model card (redact). Values the project stores and reads back
# (params, tags, run names, logged files) are masked by shape only (mask_stored): a variable's value may be any word.
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_TOKEN",
    "OPENAI_API_KEY",
    "GITHUB_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH", re.I)
# Values that are switches, not secrets (HF_HUB_DISABLE_IMPLICIT_TOKEN=1): masking "1" would mask every digit 1.
_FLAGS = {"", "0", "1", "true", "false", "yes", "no", "on", "off", "none"}
_TOKEN = re.compile(r"\b(hf_|sk-|gh[opsu]_|github_pat_)[A-Za-z0-9_-]{16,}")
_URI_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^/\s:@]*):([^/\s@]*)@")  # scheme://user:password@


def secret_values() -> list[str]:
    """Every value of a secret variable (SECRET_ENV, or a name matching SECRET_NAME) but switches, longest first,
    so a value that contains another is masked whole."""
    values = {
        v for k, v in os.environ.items() if (k in SECRET_ENV or SECRET_NAME.search(k)) and v.lower() not in _FLAGS
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` for a person to read (a terminal line, a log record, an error tag, a description, a model card): every
    secret masked, a variable's value wherever it occurs, however short. Never for a value the project reads back
    (mask_stored): with DB_PASSWORD=probe, the stored path /data/probe/x became /data/***/x and broke for good."""
    for value in secret_values():
        text = text.replace(value, "***")
    return mask_stored(text)


def mask_stored(value: str) -> str:
    """A value the project stores and reads back (params, tags such as prepared_path, run names, dataset sources,
    logged settings and adapter files): only what is a secret by its shape is masked, a URI's password and an
    access token (hf_, sk-, ghp_... followed by 16+ token characters), which no folder or setting holds by chance.
    A secret variable's value has no shape: it may be `probe`, `root` or `cache`, any path component, so masking it
    here corrupts what is read back; it is masked wherever the project writes text instead (redact)."""
    value = _URI_PASSWORD.sub(r"\1:***@", value)
    return _TOKEN.sub(lambda m: m.group(1) + "***", value)
