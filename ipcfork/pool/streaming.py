"""Lazy, bounded streams of tasks: what ``ForkPool.imap_unordered`` runs.

The input is consumed only as results are taken, so a generator of a million items keeps
memory bounded.  With persistent workers (and no per-task timeout or retries, whose meaning
is per item) short tasks are batched adaptively: every batch starts as one item, and once
finished batches show how long an item takes, the next ones carry about
``BATCH_SECONDS`` of work (at most ``MAX_BATCH`` items).  A task of 2 ms or more still
travels alone, so slow tasks keep their latency and their load balance, while a
microsecond task stops paying a pipe round trip, a pickle and a future of its own.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .tasks import StreamTask, apply_chunk

__all__ = ["BATCH_SECONDS", "MAX_BATCH", "next_batch_size", "stream_unordered"]

BATCH_SECONDS = 0.002  # work per batch once items prove short
MAX_BATCH = 1024

Sink = queue.SimpleQueue[tuple[StreamTask, bool, Any]]
Start = Callable[..., StreamTask]  # start(sink, fn, *args): queue one task


def next_batch_size(size: int, wall_time: float | None, items: int) -> int:
    """The size of the next batch after one of ``items`` items took ``wall_time`` s:
    grow by doubling toward ``BATCH_SECONDS`` of work, shrink at once when items are slow."""
    if not wall_time or wall_time <= 0:
        return min(size * 2, MAX_BATCH)
    target = int(BATCH_SECONDS * items / wall_time)
    return max(1, min(target, size * 2, MAX_BATCH))


def stream_unordered(start: Start, fn: Callable[..., Any], iterable: Iterable[Any], *,
                     in_flight: int | None, depth: int, chunksize: int | None) -> Iterator[Any]:
    """Yield ``fn(item)`` for each item in completion order (see the module docstring).

    ``chunksize``: items per task, or None for adaptive batches.

    At most ``in_flight`` items are submitted and not yet yielded (default: ``depth``
    tasks, of whatever batch size).  The first failed item's exception is raised; tasks
    not yet started are cancelled when the iterator is closed.
    """
    sink: Sink = queue.SimpleQueue()
    items = iter(iterable)
    active: dict[StreamTask, int] = {}  # task -> items it carries
    queued = 0
    size = chunksize or 1
    batching = chunksize != 1
    exhausted = False
    try:
        while True:
            limit = in_flight if in_flight is not None else depth * size
            while not exhausted and queued < limit:
                if batching:
                    batch = list(itertools.islice(items, min(size, limit - queued)))
                    if not batch:
                        exhausted = True
                        break
                    task = start(sink, apply_chunk, fn, batch)
                    count = len(batch)
                else:
                    try:
                        item = next(items)
                    except StopIteration:
                        exhausted = True
                        break
                    task = start(sink, fn, item)
                    count = 1
                active[task] = count
                queued += count
            if not active:
                return
            finished, ok, value = sink.get()
            count = active.pop(finished)
            queued -= count
            if not ok:
                raise value
            if batching:
                if chunksize is None:
                    size = next_batch_size(size, finished.record.wall_time, count)
                yield from value
            else:
                yield value
    finally:
        for task in active:
            task.cancel()
