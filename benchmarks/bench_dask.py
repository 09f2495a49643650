"""Benchmark ipcfork's dask backend against the local primitives, on a LocalCluster.

Run from the repository root (needs ``pip install distributed``)::

    python benchmarks/bench_dask.py            # ~30 s on 2 cores
    python benchmarks/bench_dask.py --quick    # ~10 s

What is measured (medians of ``--reps`` repetitions, each a loop of N operations):

1. **Mutex acquire + release**, microseconds per pair, from the client process:
   ``Mutex(name, backend="dask")`` (a dask Lock: two scheduler round trips) against the
   local ``Mutex()`` (posix).
2. **Counter add**, microseconds per add: ``SharedCounter(name=..., backend="dask")`` (one
   round trip to the actor's worker) against the local ``SharedCounter()``.
3. **Per-task overhead of forked()**, milliseconds per task: ``client.submit(forked(f))``
   against ``client.submit(f)`` for a trivial ``f``, N tasks submitted at once and
   gathered, on a ``LocalCluster(n_workers=2, threads_per_worker=2)``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from _common import core_path, gc_off, markdown_table

import ipcfork
from ipcfork.dask import forked


def noop(x: int) -> int:
    return x


def _median_per_op(loop: Callable[[int], None], n: int, reps: int) -> float:
    """Median seconds per operation of ``loop(n)`` over ``reps`` runs."""
    loop(max(1, n // 10))  # warm-up
    samples = []
    for _ in range(reps):
        with gc_off():
            began = time.perf_counter()
            loop(n)
            samples.append((time.perf_counter() - began) / n)
    return statistics.median(samples)


def _mutex_loop(mutex: Any) -> Callable[[int], None]:
    def loop(n: int) -> None:
        for _ in range(n):
            mutex.acquire()
            mutex.release()
    return loop


def _add_loop(counter: Any) -> Callable[[int], None]:
    def loop(n: int) -> None:
        for _ in range(n):
            counter.add(1)
    return loop


def _tasks_loop(client: Any, fn: Callable[[int], int]) -> Callable[[int], None]:
    def loop(n: int) -> None:
        futures = client.map(fn, range(n), pure=False)
        client.gather(futures)
    return loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    n_lock, n_local, n_tasks = (200, 20_000, 100) if args.quick else (1000, 200_000, 400)

    from distributed import Client, LocalCluster

    rows: list[tuple[str, ...]] = []
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        tag = f"bench-{os.getpid()}"
        dask_mutex = ipcfork.Mutex(f"{tag}-m", backend="dask")
        local_mutex = ipcfork.Mutex()
        dask_counter = ipcfork.SharedCounter(name=f"{tag}-c", backend="dask")
        local_counter = ipcfork.SharedCounter()
        try:
            m_dask = _median_per_op(_mutex_loop(dask_mutex), n_lock, reps)
            m_local = _median_per_op(_mutex_loop(local_mutex), n_local, reps)
            c_dask = _median_per_op(_add_loop(dask_counter), n_lock, reps)
            c_local = _median_per_op(_add_loop(local_counter), n_local, reps)
            t_plain = _median_per_op(_tasks_loop(client, noop), n_tasks, reps)
            t_forked = _median_per_op(_tasks_loop(client, forked(noop)), n_tasks, reps)
        finally:
            dask_mutex.unlink()
            dask_counter.unlink()
            for handle in (dask_mutex, local_mutex, dask_counter, local_counter):
                handle.close()
    rows = [
        ("Mutex acquire+release, dask", f"{m_dask * 1e6:,.1f} us", f"{m_dask / m_local:,.0f}x"),
        ("Mutex acquire+release, local posix", f"{m_local * 1e6:,.3f} us", "1x"),
        ("SharedCounter.add, dask (actor)", f"{c_dask * 1e6:,.1f} us",
         f"{c_dask / c_local:,.0f}x"),
        ("SharedCounter.add, local", f"{c_local * 1e6:,.3f} us", "1x"),
        ("task, plain dask", f"{t_plain * 1e3:,.2f} ms", "1x"),
        ("task, forked()", f"{t_forked * 1e3:,.2f} ms", f"{t_forked / t_plain:,.1f}x"),
    ]
    print(f"{os.cpu_count()} CPUs; {core_path()}; medians of {reps} reps; "
          f"LocalCluster(n_workers=2, threads_per_worker=2)")
    print(markdown_table(("operation", "median per op", "ratio to its reference"), rows))
    print(f"forked() overhead per task: {(t_forked - t_plain) * 1e3:,.2f} ms")


if __name__ == "__main__":
    main()
