"""The live progress line on stderr, drawn only when stderr is a terminal (so pipes, files
and ``--json`` consumers never see it)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress"]

_REDRAW = 0.1  # seconds between two redraws


class Progress:
    """``start(label)`` before a run, the returned callback with the fraction done while it
    runs, ``clear()`` when done; all of it does nothing off a terminal."""

    def __init__(self, total_runs: int, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.total_runs = total_runs
        self.started = 0
        self._label = ""
        self._shown = 0.0
        self._width = 0

    def start(self, scenario: str, guard: str, workers: int) -> Callable[[float], None] | None:
        """Announce the next run; returns the callback for its progress (None off a tty)."""
        self.started += 1
        if not self.live:
            return None
        self._label = (f"[{self.started}/{self.total_runs}] {scenario}, {guard}, "
                       f"{workers} workers")
        self._draw(f"{self._label}: starting")
        return self.update

    def update(self, fraction: float) -> None:
        """Redraw with ``fraction`` (0..1) of the current run done, at most 10 times/s."""
        now = time.monotonic()
        if now - self._shown >= _REDRAW or fraction >= 1.0:
            self._shown = now
            self._draw(f"{self._label}: {fraction:4.0%}")

    def _draw(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def clear(self) -> None:
        """Erase the line, so what follows starts on a clean line."""
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
