"""Helpers every benchmark here shares: timing hygiene, round-robin order, verdicts and
markdown tables."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["CpuWatch", "core_path", "gc_off", "markdown_table", "rotated", "verdict"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def gc_off() -> Iterator[None]:
    """Keep the cyclic garbage collector out of a timed region, as timeit does."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def rotated(items: list[Any], rep: int) -> list[Any]:
    """``items`` started at position ``rep``: each variant leads one repetition in turn."""
    start = rep % len(items)
    return items[start:] + items[:start]


def markdown_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """First column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        left = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join([left, *rest]) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]])
    return "\n".join([line(header), rule + "|", *(line(row) for row in rows)])


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def core_path() -> str:
    """Which path of ipcfork's native core this process uses, and why (for environment
    lines: the compiled extension and the ctypes fallback differ several-fold)."""
    from ipcfork._os import native as _native

    return f"ipcfork core: {_native.PATH} ({_native.WHY})"


class CpuWatch:
    """How many CPUs other processes kept busy while a block ran (noise indicator).

    The machine's busy time (/proc/stat, steal included) minus this process's and its
    reaped children's CPU time, divided by the wall time.  Both are counted in clock ticks
    (10 ms), so two ticks are forgiven: short blocks read 0 unless clearly disturbed.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as stat:
            f = [int(x) for x in stat.readline().split()[1:9]]
        busy = (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / _CLK_TCK
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def background(self) -> float:
        now, busy, mine = self._sample()
        wall, busy0, mine0 = now - self.start[0], self.start[1], self.start[2]
        other = (busy - busy0) - (mine - mine0) - 2 / _CLK_TCK
        return max(0.0, other) / wall if wall > 0 else 0.0
