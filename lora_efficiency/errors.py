"""The project's error types: bad input from the user, a failing tracking store, invalid settings."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


class TrackingError(UserError):
    """The tracking store or the artifact storage failed (unreachable, read-only, full): one line, exit 2."""


class ConfigError(UserError):
    """One or more invalid settings; each problem names the field, the value and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def shown(value: object, limit: int = 120) -> str:
    """`repr(value)`, cut to `limit` characters: a value of 5,000 digits or characters is named, not echoed."""
    try:
        text = repr(value)
    except ValueError:  # an int of 4,300+ digits has no str() or repr() (sys.set_int_max_str_digits)
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    return text if len(text) <= limit else f"{text[: limit - 20]}...<{len(text)} characters>"


def invalid(field: str, value: object, allowed: str) -> str:
    return f"{field}={shown(value)} is invalid: {allowed}"
