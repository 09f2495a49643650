"""SharedCounter against multiprocessing.Value and an unguarded shared word.

Two forked processes contend, each pinned to its own CPU and doing K operations; a pipe
releases both at once and the parent times from release to the last exit.  Variants run
interleaved, in rotated order, REPS times; the table gives the median rate (operations per
second, both processes together) and ratios.
Usage: ``python benchmarks/bench_counter.py [--quick]``.

Variants:
- ``SharedCounter.add``: lock-free, per-process stripes;
- ``SharedCounter.add_and_get``: linearizable, returns the new total;
- ``mp.Value + lock``: ``with v.get_lock(): v.value += 1`` (the figure to beat);
- ``mp.Value + lock, get``: the same, also reading the new value (as add_and_get does);
- ``unguarded word``: ``word[0] += 1`` on shared memory: fast and wrong (lost updates).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import CpuWatch, gc_off, markdown_table, rotated, verdict

import ipcfork

Body = Callable[[int], None]
Variant = Callable[[ExitStack], tuple[Body, Callable[[], int]]]


def counter_method(method: str) -> Variant:
    """A variant calling ``SharedCounter.<method>()`` K times (bound once, as users do)."""

    def variant(stack: ExitStack) -> tuple[Body, Callable[[], int]]:
        counter = stack.enter_context(ipcfork.SharedCounter())

        def body(k: int) -> None:
            step = getattr(counter, method)
            for _ in range(k):
                step()
        return body, lambda: counter.value

    variant.__name__ = f"SharedCounter.{method}"
    return variant


def mp_value(read_back: bool) -> Variant:
    """``with v.get_lock(): v.value += 1``, and with ``read_back`` the new value read too
    (what add_and_get returns)."""

    def variant(stack: ExitStack) -> tuple[Body, Callable[[], int]]:
        value = multiprocessing.Value("q", 0)

        def body(k: int) -> None:
            lock = value.get_lock()
            for _ in range(k):
                with lock:
                    value.value += 1
                    if read_back:
                        _ = value.value
        return body, lambda: int(value.value)

    variant.__name__ = "mp.Value + lock" + (", get" if read_back else "")
    return variant


def unguarded(stack: ExitStack) -> tuple[Body, Callable[[], int]]:
    shm = stack.enter_context(ipcfork.SharedMemory(8))
    word = shm.buf.cast("q")
    stack.callback(word.release)

    def body(k: int) -> None:
        for _ in range(k):
            word[0] += 1
    return body, lambda: int(word[0])


VARIANTS: dict[str, Variant] = {
    "SharedCounter.add": counter_method("add"),
    "SharedCounter.add_and_get": counter_method("add_and_get"),
    "mp.Value + lock": mp_value(read_back=False),
    "mp.Value + lock, get": mp_value(read_back=True),
    "unguarded word": unguarded,
}


def contend(variant: Variant, k: int, processes: int = 2) -> tuple[float, int]:
    """Rate (ops/s, all processes) and the final count of one contended run."""
    with ExitStack() as stack:
        body, read = variant(stack)
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pids = []
        cpus = sorted(os.sched_getaffinity(0))
        for index in range(processes):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    # One CPU each, for every variant alike: the contention is real and the
                    # scheduler cannot stack both on one CPU for part of a run.
                    os.sched_setaffinity(0, {cpus[index % len(cpus)]})
                    os.write(ready_w, b"r")
                    os.read(go_r, 1)
                    with gc_off():
                        body(k)
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        for _ in pids:
            os.read(ready_r, 1)
        start = time.perf_counter()
        os.write(go_w, b"g" * processes)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status):
                raise RuntimeError(f"a worker of {variant.__name__} failed")
        elapsed = time.perf_counter() - start
        for fd in (go_r, go_w, ready_r, ready_w):
            os.close(fd)
        return processes * k / elapsed, read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    args = parser.parse_args()
    k, reps = (50_000, 3) if args.quick else (300_000, 7)
    print(f"# SharedCounter, 2 processes x {k:,} operations, median of {reps} interleaved runs")
    print(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    finals: dict[str, list[int]] = {name: [] for name in VARIANTS}
    watch = CpuWatch()
    for rep in range(reps):
        for name in rotated(list(VARIANTS), rep):
            rate, final = contend(VARIANTS[name], k)
            rates[name].append(rate)
            finals[name].append(final)
    median = {name: statistics.median(values) for name, values in rates.items()}
    mp_rate, unguarded_rate = median["mp.Value + lock"], median["unguarded word"]
    rows = []
    for name in VARIANTS:
        lost = statistics.median(2 * k - f for f in finals[name])
        low, high = min(rates[name]) / 1e3, max(rates[name]) / 1e3
        rows.append((name, f"{median[name] / 1e3:,.0f}", f"{low:,.0f}..{high:,.0f}",
                     f"{median[name] / mp_rate:.2f}x", f"{median[name] / unguarded_rate:.2f}x",
                     f"{lost:,.0f}"))
    print(markdown_table(("variant", "k ops/s", "range", "vs mp.Value + lock", "vs unguarded",
                          "lost updates (median)"), rows))
    add_ratio = median["SharedCounter.add"] / mp_rate
    aag_ratio = median["SharedCounter.add_and_get"] / median["mp.Value + lock, get"]
    print(f"\nadd vs mp.Value + lock: {add_ratio:.2f}x (target >= 5x: {verdict(add_ratio >= 5)})")
    print(f"add_and_get vs mp.Value + lock, get: {aag_ratio:.2f}x "
          f"(target >= 1.5x: {verdict(aag_ratio >= 1.5)})")
    print(f"other processes kept {watch.background():.2f} CPUs busy during the runs")


if __name__ == "__main__":
    main()
