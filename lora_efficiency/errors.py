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


def invalid(field: str, value: object, allowed: str) -> str:
    return f"{field}={value!r} is invalid: {allowed}"
