"""Section 6 of bench_pool.py: persistent workers against multiprocessing.Pool, abs over
many items (imap_unordered one task at a time, and map)."""

from __future__ import annotations

import inspect
import statistics
from time import perf_counter
from typing import Any

from _common import CpuWatch, markdown_table
from _pool_kit import RunFailed, Variant, ratio_line, run_reps
from _pool_peers import MP

import ipcfork

PERSISTENT_IMAP = "ForkPool(2, tasks_per_child=None).imap_unordered(abs, items)"
PERSISTENT_IMAP1 = "ForkPool(2, tasks_per_child=None).imap_unordered(abs, items, chunksize=1)"
MP_IMAP = "multiprocessing.Pool(2).imap_unordered(abs, items, chunksize=1)"
PERSISTENT_MAP = "ForkPool(2, tasks_per_child=None).map(abs, items)"
MP_MAP = "multiprocessing.Pool(2).map(abs, items)"


def persistent_run(pool_kind: str, call: str, n: int) -> float:
    """``abs`` over ``n`` negative ints through a new pool of 2 (``forkpool`` with
    persistent workers, or ``mp``) made and warmed up on the same call before the clock,
    as a user keeping a pool would measure it; items per second.  Shutdown is not timed.
    The results are checked by count and sum (abs must have run on each)."""
    items = range(-n, 0)
    expected = n * (n + 1) // 2

    def run(pool: Any, items: range) -> list[int]:
        if call == "imap1" or (pool_kind == "mp" and call == "imap"):
            return list(pool.imap_unordered(abs, items, chunksize=1))
        if call == "imap":
            return list(pool.imap_unordered(abs, items))
        return list(pool.map(abs, items))

    pool = (MP.Pool(2) if pool_kind == "mp" else
            ipcfork.ForkPool(2, tasks_per_child=None))
    with pool:
        run(pool, range(-2000, 0))  # warm: workers started, the function cached
        start = perf_counter()
        results = run(pool, items)
        rate = n / (perf_counter() - start)
    if len(results) != n or sum(results) != expected:
        raise RunFailed(f"{pool_kind} {call}: wrong results")
    return rate


def section_persistent(reps: int, imap: int, maps: int) -> None:
    print(f"\n## 6. Persistent workers, abs over {imap:,} items (imap_unordered) "
          f"and {maps:,} items (map), pools of 2 (items/s, higher is better)\n")
    watch = CpuWatch()
    variants: list[Variant] = [
        (PERSISTENT_IMAP, lambda: persistent_run("forkpool", "imap", imap)),
        (MP_IMAP, lambda: persistent_run("mp", "imap", imap)),
        (PERSISTENT_MAP, lambda: persistent_run("forkpool", "map", maps)),
        (MP_MAP, lambda: persistent_run("mp", "map", maps)),
    ]
    if takes_chunksize():  # one task at a time, forced (the default may batch short items)
        variants.insert(1, (PERSISTENT_IMAP1, lambda: persistent_run("forkpool", "imap1", imap)))
    rates = run_reps(variants, reps)
    med = {label: statistics.median(r) for label, r in rates.items()}
    peer = {PERSISTENT_IMAP: MP_IMAP, PERSISTENT_IMAP1: MP_IMAP, MP_IMAP: MP_IMAP,
            PERSISTENT_MAP: MP_MAP, MP_MAP: MP_MAP}
    rows = [(label, f"{med[label]:,.0f}/s", f"{min(r):,.0f}..{max(r):,.0f}",
             f"{med[label] / med[peer[label]]:.2f}x") for label, r in rates.items()]
    print(markdown_table(("variant", "median items/s", "range", "vs its mp.Pool row"), rows))
    print(f"\n{reps} repetitions; each run makes its pool, runs the same call over 2,000 "
          "items, then starts the clock (one pool alive at a time: no other pool's threads "
          "compete for the GIL); shutdown is not timed; mp.Pool.map uses its default "
          f"chunksize; other processes kept {watch.background():.2f} CPUs busy meanwhile.\n")
    print(ratio_line("ForkPool imap_unordered / mp.Pool imap_unordered chunksize=1",
                     rates[PERSISTENT_IMAP], rates[MP_IMAP], 2.5))
    if PERSISTENT_IMAP1 in rates:
        print(ratio_line("ForkPool imap_unordered chunksize=1 / mp.Pool imap_unordered "
                         "chunksize=1", rates[PERSISTENT_IMAP1], rates[MP_IMAP], 2.5))
    print(ratio_line("ForkPool map / mp.Pool map", rates[PERSISTENT_MAP], rates[MP_MAP], 1.2))


def takes_chunksize() -> bool:
    """Whether this ipcfork's imap_unordered has a chunksize option."""
    return "chunksize" in inspect.signature(ipcfork.ForkPool.imap_unordered).parameters
