"""Progress reporting: tqdm bars on a terminal, plain lines in a log.

A tqdm bar written to a file or a pipe turns into thousands of carriage-return
fragments. :func:`progress` returns a tqdm bar when standard error is a terminal
and otherwise a :class:`LineProgress` with the same small interface (``update``,
``set_postfix``, ``close``, context manager) that prints one plain line when the
stage ends, and at most one line per ``interval`` seconds while it runs
(``interval=0``: a line per update, for slow loops such as outer epochs).
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class LineProgress:
    """A tqdm stand-in for non-terminal output: one line per stage (and per ``interval`` s)."""

    def __init__(self, total=None, desc: str = "", unit: str = "it", initial: int = 0, interval: float = LOG_INTERVAL_S,
                 file=None, disable: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.initial, self.interval, self.disable = initial, interval, disable
        self.file = file if file is not None else sys.stderr
        self.postfix = ""
        self.t0 = self.last = time.perf_counter()
        self.closed = False
        self._printed_n = None

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self._print(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self._printed_n:  # the final count, unless the last line already said it
                self._print(time.perf_counter())

    def _print(self, now: float) -> None:
        self.last, self._printed_n = now, self.n
        if self.disable:
            return
        elapsed = now - self.t0
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: {done} {self.unit} in {elapsed:.1f} s ({rate:.3g} {self.unit}/s)"
        if self.postfix:
            line += f" [{self.postfix}]"
        print(line, file=self.file, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total=None, desc: str = "", unit: str = "it", *, enabled: bool = True, initial: int = 0,
             interval: float = LOG_INTERVAL_S, leave: bool = True, unit_scale: bool = False):
    """A progress bar for a stage: tqdm on a terminal, plain lines otherwise, nothing when not ``enabled``."""
    if _is_terminal(sys.stderr):
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, leave=leave,
                    unit_scale=unit_scale, dynamic_ncols=True)
    return LineProgress(total=total, desc=desc, unit=unit, initial=initial, interval=interval, disable=not enabled)


def note(line: str) -> None:
    """A line for the person watching, on standard error, that does not break a tqdm bar."""
    if _is_terminal(sys.stderr):
        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)
