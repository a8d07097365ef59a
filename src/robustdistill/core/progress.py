"""What a library call shows while it works: the "robustdistill" logger's lines and tqdm's bars.

    with shown(progress):          # progress=True: INFO lines on stderr and progress bars
        ...                        # progress=False: warnings and errors only, no bars

The command line configures the logger itself, and a caller who has configured logging (the
"robustdistill" logger or the root one) keeps their own handlers: `shown(True)` then adds nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger("robustdistill")


@contextlib.contextmanager
def shown(progress: bool = True) -> Iterator[None]:
    """Progress for the block: with `progress`, INFO lines on stderr (unless the logger has handlers
    already) and tqdm's bars where the terminal shows them; without, warnings only and no bars."""
    level, handlers, disable = log.level, list(log.handlers), os.environ.get("TQDM_DISABLE")
    if progress and not log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    elif not progress:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        log.handlers[:] = handlers
        log.setLevel(level)
        if disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = disable
