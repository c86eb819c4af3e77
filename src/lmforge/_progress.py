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
import time


class _Lines:
    """A file for tqdm that turns its ``\r``-redrawn status into whole lines, at most one per
    ``every`` seconds (tqdm redraws on every ``set_postfix`` too, whatever its own interval), plus
    the final state when the bar closes."""

    def __init__(self, f, every: float):
        self.f, self.every = f, every
        self.last, self.last_t, self.pending = "", None, None

    def write(self, s: str) -> None:
        line = s.replace("\r", "").rstrip()
        if not line:
            if "\n" in s:  # tqdm closing a bar it leaves: its last state is the one to keep
                self._emit(self.pending)
            return
        if self.last_t is None or time.monotonic() - self.last_t >= self.every:
            self._emit(line)
        else:
            self.pending = line

    def _emit(self, line) -> None:
        if line and line != self.last:
            self.f.write(line + "\n")
            self.last, self.last_t = line, time.monotonic()
        self.pending = None

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
        every = float(os.environ.get("LMFORGE_PROGRESS_EVERY", "30"))
        kw["mininterval"] = kw["maxinterval"] = every
        kw.setdefault("ncols", 100)
        kw["leave"] = True  # the last line says where it ended
        file = _Lines(file, every)
    return tqdm(*args, file=file, disable=disable, **kw)
