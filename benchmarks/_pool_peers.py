"""Section 2 of bench_pool.py (:func:`section_transfer`): large results returned to the
parent, ForkPool against peers, and zero-copy results (``ipcfork.result_buffer``).

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
import statistics
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
from _common import CpuWatch, markdown_table
from _pool_kit import MIB, Variant, flush_std, ratio_line, run_reps

import ipcfork

try:  # the zero-copy result API; rows that need it are skipped without it
    from ipcfork import result_buffer  # type: ignore[attr-defined,unused-ignore]
except ImportError:
    try:
        from ipcfork.pool.transfer import result_buffer
    except ImportError:
        result_buffer = None

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


def make_and_write(i: int, kind: str, size: int) -> None:
    """The floor of a child writing shared memory: it makes the result, writes it into a
    fresh POSIX shm object with ``pwrite`` (as a spill is written), removes it, returns
    nothing."""
    import os

    import posix_ipc

    data = make_result(i, "bytes", size)
    shm = posix_ipc.SharedMemory(f"/ipcfork.bench.{os.getpid()}.{i}", posix_ipc.O_CREX,
                                 mode=0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.pwrite(shm.fd, view, size - view.nbytes):]
    finally:
        shm.unlink()
        shm.close_fd()


def make_view(i: int, kind: str, size: int, pause: float = 0.0) -> Any:
    """The same words as ``make_result(i, "bytes", size)``, made in place in a buffer from
    ``ipcfork.result_buffer``: returned, the parent gets a read-only view of it."""
    if pause:
        time.sleep(pause)
    buf = result_buffer(size)
    words = np.frombuffer(buf, np.uint64).reshape(-1, BLOCK_WORDS)
    words[:] = np.arange(BLOCK_WORDS, dtype=np.uint64) + np.uint64(i << 32)
    return buf


def check_result(result: Any, kind: str, size: int) -> int:
    """Raise BadResult unless ``result`` is what ``make_result(i, kind, size)`` made; ``i``.

    bytes: type, length and five words; numpy: dtype, shape, two words and the full sum;
    view (``make_view``): a read-only memoryview, its length and five words; view-read:
    the same and every word summed.
    """
    words = size // 8
    if kind in ("view", "view-read"):
        if type(result) is not memoryview or not result.readonly or result.nbytes != size:
            raise BadResult(f"expected a read-only memoryview of {size} bytes, got "
                            f"{result!r:.80}")
        if kind == "view-read":  # every word read, as the numpy check does
            return check_result(np.frombuffer(result, np.uint64), "numpy", size)
    if kind in ("bytes", "view"):
        if kind == "bytes" and (type(result) is not bytes or len(result) != size):
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
    task: Callable[..., Any] | None = None  # instead of make_result / make_and_drop
    kinds: tuple[str, ...] = ("bytes", "numpy")  # result kinds this variant runs


FORKPOOL = "ForkPool(2), submit + as_completed"
MP_POOL = "multiprocessing.Pool(2), imap_unordered"
PEERS = ("ProcessPoolExecutor(2), as_completed", "loky(2), as_completed",
         "mpire(2), imap_unordered")
OPTIONAL = {"loky(2), as_completed": "loky", "mpire(2), imap_unordered": "mpire",
            "pebble ProcessPool(2), as_completed": "pebble"}
FLOOR_SHM = "(floor) ForkPool(2), child makes the result, writes it to new shm, returns None"
ZERO_COPY = "ForkPool(2), result_buffer, 5 words checked"


def installed(label: str) -> bool:
    """Whether the library behind a variant is installed (loky, mpire and pebble are
    optional: their rows are skipped without them)."""
    module = OPTIONAL.get(label)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def transfer_variants(persistent: bool, zygote: bool = False) -> list[Transfer]:
    """Section 2's variants (bytes and numpy results), then the zero-copy ones (kind view)
    when this ipcfork has ``result_buffer``; libraries not installed are left out."""
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
        Transfer(FLOOR_SHM, forkpool_submit, produce_only=True, task=make_and_write,
                 kinds=("bytes",)),
    ]
    if result_buffer is not None:
        variants += [
            Transfer(ZERO_COPY, forkpool_submit, task=make_view, kinds=("view",)),
            Transfer("ForkPool(2), result_buffer, every word read", forkpool_submit,
                     task=make_view, kinds=("view-read",)),
        ]
        if persistent:
            variants.append(Transfer("ForkPool(2, tasks_per_child=None), result_buffer",
                                     lambda: forkpool_submit(tasks_per_child=None),
                                     task=make_view, kinds=("view",)))
        if zygote:
            variants.append(Transfer("ForkPool(2, zygote=True), result_buffer",
                                     lambda: forkpool_submit(zygote=True), task=make_view,
                                     kinds=("view",)))
    return [v for v in variants if installed(v.label)]


def run_transfer(variant: Transfer, kind: str, count: int, size: int) -> float:
    """One timed run: ``count`` results of ``size`` bytes; MiB/s.

    The pool is built and warmed up (4 tiny tasks that sleep 50 ms, so every worker exists
    and has imported numpy) before the clock starts; its shutdown is not timed.  Each result
    is checked, then dropped before the next is taken.
    """
    task = variant.task or (make_and_drop if variant.produce_only else make_result)
    fn = functools.partial(task, kind=kind, size=size)
    maker = make_view if task is make_view else make_result
    warm = functools.partial(maker, kind=kind, size=BLOCK, pause=0.05)
    seen: list[int] = []
    with variant.factory() as stream:
        for result in stream(warm, range(2 * WORKERS)):
            check_result(result, "view" if maker is make_view else kind, BLOCK)
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


# -- the section ------------------------------------------------------------------------


def section_transfer(count: int, size: int, reps: int, persistent: bool, zygote: bool,
                     skipped: str) -> None:
    """Section 2 of bench_pool.py (``skipped``: its note on options this ipcfork refused)."""
    print(f"\n## 2. {count} results of {size // MIB} MiB returned to the parent, 2 workers "
          "(MiB/s, higher is better)\n")
    watch = CpuWatch()
    variants = transfer_variants(persistent, zygote)
    kinds = ("bytes", "numpy")
    runs: list[Variant] = []
    for v in variants:
        for kind in v.kinds:
            runs.append((f"{kind}|{v.label}",
                         functools.partial(run_transfer, v, kind, count, size)))
    for v in variants:  # warm-up: a quarter of the results, each variant and kind once
        for kind in v.kinds:
            flush_std()
            run_transfer(v, kind, max(2, count // 4), size)
    rates = run_reps(runs, reps, warmup=False)
    med = {key: statistics.median(r) for key, r in rates.items()}
    mp_bytes = med[f"bytes|{MP_POOL}"]
    rows = []
    for v in variants:
        if not set(kinds) & set(v.kinds):
            continue
        cells: list[str] = [v.label]
        for kind in kinds:
            rate = med.get(f"{kind}|{v.label}")
            cells += (["-", "-"] if rate is None else
                      [f"{rate:,.0f}", f"{rate / med[f'{kind}|{MP_POOL}']:.2f}x"])
        rows.append(tuple(cells))
    print(markdown_table(("variant", "bytes MiB/s", "vs mp.Pool", "numpy MiB/s",
                          "vs mp.Pool"), rows))
    missing = [label for label in OPTIONAL if not installed(label)]
    print(f"\n{reps} repetitions after a warm-up; the clock runs from the first "
          "submit to the last result checked (pool creation and warm-up excluded); "
          f"other processes kept {watch.background():.2f} CPUs busy meanwhile."
          + skipped
          + (f"  Not installed, skipped: {', '.join(missing)}." if missing else "") + "\n")
    floor = rates[f"bytes|{FLOOR_SHM}"]
    for kind in kinds:
        mine = rates[f"{kind}|{FORKPOOL}"]
        print(ratio_line(f"{kind}: ForkPool / mp.Pool", mine, rates[f"{kind}|{MP_POOL}"],
                         5.0))
        peer_rates = {label: med[f"{kind}|{label}"] for label in PEERS
                      if f"{kind}|{label}" in med}
        best = max(peer_rates, key=peer_rates.__getitem__)
        print(ratio_line(f"{kind}: ForkPool / best of loky, mpire, PPE ({best.split('(')[0]})",
                         mine, rates[f"{kind}|{best}"], 3.0))
    print(ratio_line("bytes: ForkPool / floor (child makes and writes shm)",
                     rates[f"bytes|{FORKPOOL}"], floor, 0.6))
    views = [v for v in variants if {"view", "view-read"} & set(v.kinds)]
    if not views:
        print("\nZero-copy results: this ipcfork has no result_buffer; not measured.")
        return
    print(f"\n### 2b. Zero-copy: the child fills ipcfork.result_buffer({size // MIB} MiB) in "
          "place and returns it; the parent gets a read-only memoryview of the same pages\n")
    rows = []
    for v in views:
        for kind in v.kinds:
            rate = med[f"{kind}|{v.label}"]
            rows.append((v.label, f"{rate:,.0f}", f"{rate / mp_bytes:.2f}x",
                         f"{rate / med[f'bytes|{FORKPOOL}']:.2f}x",
                         f"{rate / statistics.median(floor):.2f}x"))
    for label in (FORKPOOL, MP_POOL, FLOOR_SHM):
        rate = med[f"bytes|{label}"]
        rows.append((f"{label} (bytes)", f"{rate:,.0f}", f"{rate / mp_bytes:.2f}x",
                     f"{rate / med[f'bytes|{FORKPOOL}']:.2f}x",
                     f"{rate / statistics.median(floor):.2f}x"))
    print(markdown_table(("variant", "MiB/s", "vs mp.Pool bytes", "vs ForkPool bytes",
                          "vs floor"), rows))
    print("\nSame repetitions as the table above (all variants interleaved).  '5 words "
          "checked' reads what the bytes check reads; 'every word read' sums the whole view "
          "in the parent (its page faults included).  floor: the child makes the bytes "
          "result, pwrites it into a new shm object and returns None.\n")
    zero = rates[f"view|{ZERO_COPY}"]
    print(ratio_line("result_buffer: ForkPool / mp.Pool bytes", zero,
                     rates[f"bytes|{MP_POOL}"], 5.0))
    print(ratio_line("result_buffer: ForkPool / floor (child makes and writes shm)", zero,
                     floor, 0.6))
