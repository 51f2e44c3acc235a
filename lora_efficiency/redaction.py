"""Secrets never reach the tracking store, the terminal or an error tag."""

from __future__ import annotations

import os
import re

# Secrets never reach the tracking store: the values of these variables, and anything shaped like a Hugging Face,
# OpenAI or GitHub token, are replaced by `<prefix>***` in every param, tag, text and artifact this project logs.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "OPENAI_API_KEY", "GITHUB_TOKEN")
_TOKEN = re.compile(r"\b(hf_|sk-|gh[opsu]_|github_pat_)[A-Za-z0-9_-]{16,}")


def redact(text: str) -> str:
    for name in SECRET_ENV:
        if len(value := os.environ.get(name, "")) >= 8:
            text = text.replace(value, "***")
    return _TOKEN.sub(lambda m: m.group(1) + "***", text)
