"""Benchmark the ledger of resumable batches: what ``ledger=`` costs a batch of 1 ms tasks.

Run from the repository root::

    python benchmarks/bench_ledger.py            # full: about 2 min on 2 cores
    python benchmarks/bench_ledger.py --quick    # smoke run: about 20 s

Options: ``--reps N`` (repetitions), ``--tasks N`` (tasks per persistent run; fork-per-task
runs use a fifth of them).

What is measured
----------------
Seconds per batch, the same batch with and without ``ledger=`` (a fresh ledger file per
run, so every task runs and is recorded; the ledger is deleted after the run):

1. ``ForkPool(2, tasks_per_child=None).map`` (persistent workers, default chunksize),
   tasks of ``time.sleep(0.001)``: the headline figure.  Target: ledger / plain <= 1.10.
2. The same with a 1 ms busy loop (the workers take both CPUs, so the parent's work for
   the ledger competes with them).
3. ``ForkPool(2).map`` forking a child per task (sleep 1 ms).
4. ``ForkPool(2, tasks_per_child=None).imap_unordered`` (sleep 1 ms); plain runs with
   its adaptive batches, the ledger one task per item.

Method: every pool is made and warmed up before the clock (as a user keeping a pool
measures it); every variant is warmed up, then each repetition runs all variants in
rotated order (round-robin); tables show medians, target lines the range of the
per-repetition ratios.  The noise line says how many CPUs other processes kept busy;
with persistent workers it counts the pool's own workers too (they are reaped only when
the pool ends), so read it for sections 1 and 3 (sleeping tasks) and the fork section.
Every batch's results are checked.  Exit status: 0 when every result was right, 1
otherwise (a missed target is reported, not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import CpuWatch, core_path, markdown_table
from _pool_kit import RunFailed, Variant, ratio_line, run_reps

import ipcfork

TASK_SECONDS = 0.001


def sleepy(i: int) -> int:
    time.sleep(TASK_SECONDS)
    return i * 2


def busy(i: int) -> int:
    end = time.perf_counter() + TASK_SECONDS
    while time.perf_counter() < end:
        pass
    return i * 2


def _remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-lock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def batch(pool: ipcfork.ForkPool, fn: Callable[[int], int], n: int, *, ledger: bool,
          unordered: bool) -> Callable[[], float]:
    """One timed batch of ``n`` tasks: seconds."""
    folder = tempfile.mkdtemp(prefix="bench-ledger-")

    def run() -> float:
        path = os.path.join(folder, "batch.sqlite")
        options: dict[str, Any] = {"ledger": path} if ledger else {}
        began = time.perf_counter()
        if unordered:
            results = sorted(pool.imap_unordered(fn, range(n), **options))
        else:
            results = list(pool.map(fn, range(n), **options))
        seconds = time.perf_counter() - began
        if results != [2 * i for i in range(n)]:
            raise RunFailed(f"wrong results from {fn.__name__} (ledger={ledger})")
        _remove(path)
        return seconds

    return run


def section(title: str, pool: ipcfork.ForkPool, fn: Callable[[int], int], n: int,
            reps: int, unordered: bool = False) -> list[str]:
    list(pool.map(abs, range(4)))  # workers up before the clock
    variants: list[Variant] = [
        ("plain", batch(pool, fn, n, ledger=False, unordered=unordered)),
        ("ledger", batch(pool, fn, n, ledger=True, unordered=unordered)),
    ]
    watch = CpuWatch()
    samples = run_reps(variants, reps)
    rows = []
    for label, values in samples.items():
        median = statistics.median(values)
        rows.append((label, f"{median * 1e3:.0f}", f"{n / median:,.0f}",
                     f"{(median - n * TASK_SECONDS / 2) / n * 1e6:.0f}"))
    lines = [f"### {title} ({n} tasks of 1 ms, {reps} repetitions)", "",
             markdown_table(("variant", "ms (median)", "tasks/s", "us/task over ideal"),
                            rows), "",
             ratio_line("ledger / plain", samples["ledger"], samples["plain"], 1.10,
                        higher_is_better=False),
             f"- noise: other processes kept {watch.background():.2f} CPUs busy", ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--reps", type=int, help="repetitions (default 7, quick 2)")
    parser.add_argument("--tasks", type=int, help="tasks per persistent run (default "
                        "3000, quick 1000)")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 7)
    n = args.tasks or (1000 if args.quick else 3000)
    print(f"environment: python {sys.version.split()[0]} | nproc "
          f"{len(os.sched_getaffinity(0))} | load {os.getloadavg()[0]:.2f} | {core_path()}")
    print()
    out: list[str] = []
    try:
        with ipcfork.ForkPool(2, tasks_per_child=None) as pool:
            out += section("1. persistent workers, map, sleep", pool, sleepy, n, reps)
            print("\n".join(out[-8:]), flush=True)
            out += section("2. persistent workers, map, busy loop", pool, busy, n, reps)
            print("\n".join(out[-8:]), flush=True)
            out += section("4. persistent workers, imap_unordered, sleep", pool, sleepy, n,
                           reps, unordered=True)
            print("\n".join(out[-8:]), flush=True)
        with ipcfork.ForkPool(2) as pool:
            out += section("3. fork per task, map, sleep", pool, sleepy, n // 5, reps)
            print("\n".join(out[-8:]), flush=True)
    except RunFailed as exc:
        print(f"FAILED: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
