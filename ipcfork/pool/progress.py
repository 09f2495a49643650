"""``progress=True``: a progress bar over results as they arrive.

tqdm draws it when installed (``pip install ipcfork[progress]``); otherwise a plain one-line
counter goes to stderr, redrawn at most ten times a second, and only on a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["with_progress"]

T = TypeVar("T")


def with_progress(results: Iterable[T], total: int | None, label: str) -> Iterator[T]:
    """Yield ``results`` unchanged while showing how many have arrived."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield from _plain(results, total, label)
        return
    bar: Any = tqdm(total=total, desc=label, unit="task")
    try:
        for item in results:
            bar.update(1)
            yield item
    finally:
        bar.close()


def _plain(results: Iterable[T], total: int | None, label: str) -> Iterator[T]:
    stream = sys.stderr
    live = stream.isatty()
    done = 0
    shown = 0.0
    of = f"/{total}" if total is not None else ""
    try:
        for item in results:
            done += 1
            now = time.monotonic()
            if live and now - shown >= 0.1:
                stream.write(f"\r{label}: {done}{of}")
                stream.flush()
                shown = now
            yield item
    finally:
        if live:
            stream.write(f"\r{label}: {done}{of}\n")
            stream.flush()
