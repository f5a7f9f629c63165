"""Progress a person can follow: a tqdm bar on a terminal; in a log file (or CI), a plain line per interval.

A bar redrawn with carriage returns is what a terminal wants and what a log file must not get: a default run's log
was ~92% bar frames. ``progress_bar`` takes tqdm's arguments and returns a tqdm bar when its stream is a terminal,
else a ``LineBar``: the same meter (count, rate, elapsed and ETA, postfix) written as one line every
``DISTILLERY_PROGRESS_INTERVAL_S`` seconds (30 by default), plus a last line when it ends.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

INTERVAL_ENV = "DISTILLERY_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class LineBar(tqdm):
    """tqdm that writes its meter as whole lines, at most one per ``every`` seconds (and one at the end), never a
    carriage return."""

    def __init__(self, *args: Any, every: float | None = None, **kwargs: Any) -> None:
        self._every = _interval() if every is None else every
        self._last_line = float("-inf")
        kwargs.pop("dynamic_ncols", None)
        kwargs["leave"] = False  # its last line is written by close; a log has no bar to leave or clear
        super().__init__(*args, **kwargs)

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> None:  # noqa: D102
        now = time.monotonic()
        if now - self._last_line < self._every:  # set_postfix and update ask for a redraw on every step
            return
        self._last_line = now
        super().refresh(nolock=nolock, lock_args=lock_args)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:  # noqa: D102
        if msg == "":  # tqdm clearing a finished bar: nothing to clear in a log (False: nor a carriage return)
            return False
        line = (msg if msg is not None else self.__str__()).replace("\r", "").rstrip()
        if line:
            self.fp.write(line + "\n")
            self.fp.flush()
        return True

    def close(self) -> None:  # noqa: D102
        if not self.disable and self.n:  # the final count, whatever the interval
            self.display()
        super().close()


def _terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A progress bar over ``iterable`` (tqdm's keyword arguments): redrawn on a terminal, a line per interval
    elsewhere."""
    stream = kwargs.get("file") or sys.stderr
    if _terminal(stream):
        return tqdm(iterable, **kwargs)
    return LineBar(iterable, **kwargs)
