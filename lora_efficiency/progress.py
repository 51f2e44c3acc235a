"""Progress: tqdm bars on a terminal, plain lines elsewhere (CI logs, pipes, files).

A sweep runs each child with stderr on a pipe it forwards, so it tells the child what to draw: PROGRESS_ENV
("bar" or "lines") and BAR_POSITION_ENV (the child's step bar goes on the line under the sweep's bar).
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

PROGRESS_ENV = "LORA_EFFICIENCY_PROGRESS"
BAR_POSITION_ENV = "LORA_EFFICIENCY_BAR_POSITION"


def bars_wanted() -> bool:
    mode = os.environ.get(PROGRESS_ENV, "")
    if mode in ("bar", "lines"):
        return mode == "bar"
    return sys.stderr.isatty()


def bar(*, total: int, desc: str, unit: str, position: int | None = None):
    """A tqdm bar on stderr; under a sweep, a step bar sits below the sweep's and is cleared when done."""
    if position is None:
        position = int(os.environ.get(BAR_POSITION_ENV, "0") or 0)
    return tqdm(total=total, desc=desc, unit=unit, position=position, leave=position == 0, dynamic_ncols=True)
