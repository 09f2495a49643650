"""Helpers every benchmark here shares: timing hygiene, round-robin order, verdicts and
markdown tables."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["gc_off", "markdown_table", "rotated", "verdict"]


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
