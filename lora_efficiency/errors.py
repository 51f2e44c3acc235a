"""The project's error types: bad input from the user, a failing tracking store, invalid settings; and how a value
from the user or the store is shown in a line: bounded before it is built, its control characters escaped."""

from __future__ import annotations

import re
import reprlib


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


class TrackingError(UserError):
    """The tracking store or the artifact storage failed (unreachable, read-only, full): one line, exit 2."""


class ConfigError(UserError):
    """One or more invalid settings; each problem names the field, the value and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class _Bounded(reprlib.Repr):
    """reprlib's repr: a string is cut before it is quoted, a list or mapping after its first items, nesting after a
    few levels, so the text is built in O(limit) whatever the value holds. `repr()` of a 9-level YAML alias bomb (a
    list of 10^9 leaves built from 442 bytes) was a 1.6 GB error line before it was cut."""

    def __init__(self, limit: int):
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 8, 8, 8, 8
        self.maxstring = self.maxother = self.maxlong = limit

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 3 * self.maxlong:  # 10^n needs ~3.3 n bits: str() of it would be longer than the limit
            return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
        return super().repr_int(x, level)


def shown(value: object, limit: int = 120) -> str:
    """`repr(value)`, at most about `limit` characters, bounded while it is built (never the whole repr first): a
    value of 5,000 digits or characters, or a list of 10^9 items, is named, not echoed."""
    text = _Bounded(limit).repr(value)
    if len(text) > limit:
        return f"{text[: limit - 20]}...<cut at {limit} characters>"
    if isinstance(value, str) and len(value) > limit:
        return f"{text}<of {len(value)} characters>"
    return text


def invalid(field: str, value: object, allowed: str) -> str:
    return f"{field}={shown(value)} is invalid: {allowed}"


# C0 and C1 controls (ESC starts a colour or an OSC title; a newline forges a second `error:` line), DEL, and the
# format characters that reorder or hide text: bidirectional embeddings, overrides and isolates (U+202E shows
# "exe.txt" as "txt.exe"), zero-width characters, line and paragraph separators.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def printable(text: object) -> str:
    """`text` as one terminal line: every control and bidirectional character written as its escape (`\\x1b`,
    `\\n`, `\\u202e`), everything else as it is. Every string from a user or the store that the project prints
    goes through here."""
    return _UNPRINTABLE.sub(_escape, str(text))


def printable_lines(text: object) -> str:
    """printable() line by line: text meant to span lines (a model's answer) keeps its line breaks, and nothing else
    that could move the cursor, recolour the terminal or reorder what is shown."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def _escape(match: re.Match) -> str:
    char = match.group()
    return repr(char)[1:-1] if ord(char) < 0x100 else f"\\u{ord(char):04x}"


# Lines of a library's message that wrap the cause rather than say it: SQLAlchemy puts "(raised as a result of
# Query-invoked autoflush; ...)" before "(sqlite3.OperationalError) attempt to write a readonly database", and the
# statement and a link after it.
_WRAPPER_LINE = re.compile(r"\(raised as a result of |\[SQL: |\[parameters: |\(Background on this error at: ")


def cause_line(error: BaseException | str) -> str:
    """The line of an exception's message that names its cause: the first line that is not a wrapper's (above);
    the type's name when the message is empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in lines if not _WRAPPER_LINE.match(line)), lines[0] if lines else "")
    return cause or (type(error).__name__ if isinstance(error, BaseException) else "")
