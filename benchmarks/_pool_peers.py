"""Section 2 of bench_pool.py: large results returned to the parent, ForkPool against peers.

Each variant is a context manager that builds a pool of 2 workers and yields a *stream*:
``stream(fn, items)`` runs ``fn(i)`` for every ``i`` in ``items`` and yields the results in
completion order, with that library's natural API (``imap_unordered`` where there is one,
else ``submit`` + ``concurrent.futures.as_completed``, which drops each future once yielded).
The task functions live here so that loky's workers (fresh interpreters) can import them.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np

import ipcfork

Task = Callable[[int], Any]
Stream = Callable[[Task, range], Iterator[Any]]
Factory = Callable[[], contextlib.AbstractContextManager[Stream]]
MP = multiprocessing.get_context("fork")
WORKERS = 2
BLOCK_WORDS = 8192  # results repeat a 64 KiB block of uint64 words
BLOCK = BLOCK_WORDS * 8


class BadResult(Exception):
    """A result arrived wrong (length, type or content)."""


# -- the task (runs in the workers) ------------------------------------------------------


def make_result(i: int, kind: str, size: int, pause: float = 0.0) -> Any:
    """``size`` bytes (a multiple of 64 KiB) whose word ``w`` is ``w % 8192 + (i << 32)``,
    as ``bytes`` or as a numpy uint64 array."""
    if pause:
        time.sleep(pause)
    block = np.arange(BLOCK_WORDS, dtype=np.uint64) + np.uint64(i << 32)
    if kind == "bytes":
        return block.tobytes() * (size // BLOCK)
    return np.tile(block, size // BLOCK)


def make_and_drop(i: int, kind: str, size: int) -> None:
    """The production alone: the child makes the result and returns nothing."""
    make_result(i, kind, size)


def check_result(result: Any, kind: str, size: int) -> int:
    """Raise BadResult unless ``result`` is what ``make_result(i, kind, size)`` made; ``i``.

    bytes: type, length and five words; numpy: dtype, shape, two words and the full sum.
    """
    words = size // 8
    if kind == "bytes":
        if type(result) is not bytes or len(result) != size:
            raise BadResult(f"expected {size} bytes, got {type(result).__name__} "
                            f"of {len(result) if isinstance(result, bytes) else '?'}")
        i = struct.unpack_from("<Q", result, 0)[0] >> 32
        for w in sorted({1, BLOCK_WORDS - 1, words // 2 + 3, words - 1, BLOCK_WORDS % words}):
            got = struct.unpack_from("<Q", result, 8 * w)[0]
            if got != w % BLOCK_WORDS + (i << 32):
                raise BadResult(f"result {i}: word {w} is {got:#x}")
        return int(i)
    if not isinstance(result, np.ndarray) or result.dtype != np.uint64 or result.shape != (
            words,):
        raise BadResult(f"expected a uint64 array of {words} words, got {result!r:.80}")
    i = int(result[0]) >> 32
    expected = (words // BLOCK_WORDS) * (BLOCK_WORDS * (BLOCK_WORDS - 1) // 2) + words * (i << 32)
    total = int(result.sum())
    if total != expected or int(result[-1]) != BLOCK_WORDS - 1 + (i << 32):
        raise BadResult(f"result {i}: sum {total} != {expected}")
    return i


# -- the variants ------------------------------------------------------------------------


def _as_completed(submit: Callable[[Task, int], Future[Any]]) -> Stream:
    def stream(fn: Task, items: range) -> Iterator[Any]:
        return (future.result() for future in as_completed([submit(fn, i) for i in items]))

    return stream


@contextlib.contextmanager
def forkpool_submit(**options: Any) -> Iterator[Stream]:
    with ipcfork.ForkPool(WORKERS, **options) as pool:
        yield _as_completed(pool.submit)


@contextlib.contextmanager
def forkpool_imap() -> Iterator[Stream]:
    with ipcfork.ForkPool(WORKERS) as pool:
        yield pool.imap_unordered


@contextlib.contextmanager
def mp_pool() -> Iterator[Stream]:
    pool = MP.Pool(WORKERS)
    try:
        yield pool.imap_unordered
    finally:
        pool.close()
        pool.join()


@contextlib.contextmanager
def process_pool_executor() -> Iterator[Stream]:
    with ProcessPoolExecutor(WORKERS, mp_context=MP) as executor:
        yield _as_completed(executor.submit)


@contextlib.contextmanager
def loky_executor() -> Iterator[Stream]:
    import loky

    executor = loky.ProcessPoolExecutor(max_workers=WORKERS)  # loky's own start method
    try:
        yield _as_completed(executor.submit)
    finally:
        executor.shutdown(wait=True)


@contextlib.contextmanager
def mpire_pool() -> Iterator[Stream]:
    import tqdm
    from mpire.pool import WorkerPool

    tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread (ForkPool warns about threads)
    pool = WorkerPool(n_jobs=WORKERS, start_method="fork", keep_alive=True)
    try:
        yield lambda fn, items: pool.imap_unordered(fn, items)
    finally:
        pool.stop_and_join()


@contextlib.contextmanager
def pebble_pool() -> Iterator[Stream]:
    import pebble

    pool = pebble.ProcessPool(max_workers=WORKERS, context=MP)
    try:
        yield _as_completed(lambda fn, i: pool.schedule(fn, args=(i,)))
    finally:
        pool.close()  # type: ignore[no-untyped-call]
        pool.join()


@dataclass(frozen=True)
class Transfer:
    label: str
    factory: Factory
    produce_only: bool = False  # the child makes the result but returns None


FORKPOOL = "ForkPool(2), submit + as_completed"
MP_POOL = "multiprocessing.Pool(2), imap_unordered"
PEERS = ("ProcessPoolExecutor(2), as_completed", "loky(2), as_completed",
         "mpire(2), imap_unordered")


def transfer_variants(persistent: bool) -> list[Transfer]:
    variants = [
        Transfer(FORKPOOL, forkpool_submit),
        Transfer("ForkPool(2), imap_unordered", forkpool_imap),
    ]
    if persistent:
        variants.append(Transfer("ForkPool(2, tasks_per_child=None), submit",
                                 lambda: forkpool_submit(tasks_per_child=None)))
    variants += [
        Transfer(MP_POOL, mp_pool),
        Transfer(PEERS[0], process_pool_executor),
        Transfer(PEERS[1], loky_executor),
        Transfer(PEERS[2], mpire_pool),
        Transfer("pebble ProcessPool(2), as_completed", pebble_pool),
        Transfer("(floor) ForkPool(2), child makes the result, returns None", forkpool_submit,
                 produce_only=True),
    ]
    return variants


def run_transfer(variant: Transfer, kind: str, count: int, size: int) -> float:
    """One timed run: ``count`` results of ``size`` bytes; MiB/s.

    The pool is built and warmed up (4 tiny tasks that sleep 50 ms, so every worker exists
    and has imported numpy) before the clock starts; its shutdown is not timed.  Each result
    is checked, then dropped before the next is taken.
    """
    task = make_and_drop if variant.produce_only else make_result
    fn = functools.partial(task, kind=kind, size=size)
    warm = functools.partial(make_result, kind=kind, size=BLOCK, pause=0.05)
    seen: list[int] = []
    with variant.factory() as stream:
        for result in stream(warm, range(2 * WORKERS)):
            check_result(result, kind, BLOCK)
        del result
        gc.collect()
        start = time.perf_counter()
        for result in stream(fn, range(count)):
            if not variant.produce_only:
                seen.append(check_result(result, kind, size))
            del result
        elapsed = time.perf_counter() - start
    if not variant.produce_only and sorted(seen) != list(range(count)):
        raise BadResult(f"{variant.label}: results {sorted(seen)} != 0..{count - 1}")
    return count * size / elapsed / 2**20
