"""Reading the project's own input files (the defaults file, sweep files, profiles): regular files only, of a
bounded size, parsed as YAML without aliases. Memory stays bounded by the file's size, whatever it holds."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from lora_efficiency.errors import UserError, shown

# configs/default.yaml, the largest settings file, is 14 KB; a sweep listing 201 configurations is ~20 KB. 1 MiB is
# 70x that, and reading it (at most MAX_SETTINGS_BYTES + 1 bytes: `--defaults /dev/zero` reached 8.8 GB in 17 s)
# and parsing it without aliases stays within a few tens of MB.
MAX_SETTINGS_BYTES = 1 << 20

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    """What a file of this st_mode is, in words: "a regular file", "a folder", "a FIFO (named pipe)"..."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file" if stat.S_ISREG(mode) else "special")


def path_kind(path: str | Path) -> str | None:
    """What `path` names ("a regular file", "a folder", "a character device"...), following links; None when it
    does not exist or the OS refuses the name (too long, a NUL byte). stat() never blocks, even on a FIFO."""
    try:
        return kind_of(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None


def read_text_file(path: str | Path, what: str, limit: int = MAX_SETTINGS_BYTES, as_what: str = "text") -> str:
    """The UTF-8 text of the regular file `path`, of at most `limit` bytes; anything else is one UserError naming
    `what` (the setting that gave the path) and what the path is. The file is opened without blocking (a FIFO with
    no writer would block open() forever), checked on its open descriptor (no window between check and read), and
    read up to limit + 1 bytes, so a device or a growing file never costs more than that."""

    def refuse(reason: str) -> UserError:
        return UserError(f"{what}={shown(str(path))} could not be read as {as_what}: {reason}")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise refuse(exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise refuse(f"it is {kind_of(mode)}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise refuse(f"it is larger than {limit:,} bytes, the most a settings file may hold")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (safe_load keeps the last one
    silently: a sweep file with `rank:` three times ran 1 configuration instead of 3), and so is an alias (`*a`)
    or anchor (`&a`): nine levels of aliases in a 442-byte sweep file expand to 10^9 leaves (5.2 GB, 162 s, then a
    1.6 GB error line). Without aliases a document's objects are at most as many as its bytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{event.anchor}) is not allowed: write the value out", event.start_mark
            )
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, f"an anchor (&{event.anchor}) is not allowed: write the value out", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {shown(key)} is given twice, on lines {seen[key]} and {key_node.start_mark.line + 1}",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def load_yaml(text: str) -> Any:
    """yaml.safe_load that refuses a key given twice in a mapping and any alias or anchor (every YAML file of this
    project goes here)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: str | Path, what: str) -> Any:
    """The YAML document of a settings file (read_text_file's checks, then load_yaml); one UserError otherwise."""
    text = read_text_file(path, what, as_what="YAML")
    try:
        return load_yaml(text)
    except RecursionError:  # 1 MiB of `[` nests 500,000 levels; PyYAML composes them recursively
        raise UserError(f"{what}={shown(str(path))} could not be read as YAML: nested too deeply") from None
    except (ValueError, yaml.YAMLError) as exc:  # ValueError: an int of 4,300+ digits
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what}={shown(str(path))} could not be read as YAML: {first[:300]}") from None
