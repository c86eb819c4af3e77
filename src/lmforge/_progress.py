"""Progress bars that fit a log: tqdm on a terminal, periodic plain lines elsewhere.

On a terminal, ``bar(...)`` is ``tqdm`` itself. When stderr is not a terminal
(``lmforge run 2>&1 | tee log``, CI, a job scheduler) a carriage-return bar
would write hundreds of fragments that glue onto the next line; instead the same
tqdm line is written as a whole line at most every ``LMFORGE_PROGRESS_EVERY``
seconds (default 30), plus the final state. ``LMFORGE_PROGRESS=bar|lines|off``
forces a mode. Knows nothing about what is being counted.
"""
from __future__ import annotations

import os
import sys


class _Lines:
    """A file for tqdm that turns its ``\\r``-redrawn status into whole lines."""

    def __init__(self, f):
        self.f = f
        self.last = ""

    def write(self, s: str) -> None:
        line = s.replace("\r", "").rstrip()
        if line and line != self.last:
            self.f.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.f.flush()


def mode(stream=None) -> str:
    forced = os.environ.get("LMFORGE_PROGRESS", "")
    if forced in ("bar", "lines", "off"):
        return forced
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def bar(*args, file=None, disable: bool = False, **kw):
    """``tqdm(*args, **kw)`` on a terminal; whole lines every few seconds when not (see the module doc)."""
    from tqdm import tqdm

    file = file or sys.stderr
    m = mode(file)
    if m == "off":
        disable = True
    elif m == "lines":
        kw.pop("dynamic_ncols", None)
        kw["mininterval"] = kw["maxinterval"] = float(os.environ.get("LMFORGE_PROGRESS_EVERY", "30"))
        kw.setdefault("ncols", 100)
        kw["leave"] = True  # the last line says where it ended
        file = _Lines(file)
    return tqdm(*args, file=file, disable=disable, **kw)
