"""The report's own files: each written beside its name, then renamed over it, so no write ever goes through a link
that someone placed in the output folder."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_file(path: Path, data: bytes) -> None:
    """`data` as `path`, never written through a link: into a new file beside it (O_EXCL: never an existing name,
    link or not), then renamed over the name. A `path` that was a symlink or a hard link to a file elsewhere loses
    the link; that file is left as it was."""
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
