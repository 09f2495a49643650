"""Benchmark ipcfork.ForkPool (a fresh forked child per task) against bare fork, the standard
library and other process pools.

Run from the repository root::

    python benchmarks/bench_pool.py            # full: ~5.5 min on 2 cores
    python benchmarks/bench_pool.py --quick    # smoke run: ~1 min

Options: ``--reps N`` (repetitions of sections 1, 3, 4, 6), ``--transfer-reps N`` (section 2),
``--only 1,3`` (a subset of the sections).

What is measured
----------------
1. **Fork per task**, tasks/s, a trivial task returning a small int, N tasks per run:
   ``ForkPool(2)`` (``map`` and ``imap_unordered``) made and warmed up (a task per worker)
   before the clock, as a user keeping a pool measures it, against a sequential bare
   ``os.fork()`` / ``os._exit(0)`` / ``os.waitpid`` loop and sequential
   ``multiprocessing.Process`` (fork context) start + join; rows with pool creation and
   shutdown inside the clock for reference.  Targets: ForkPool(2).map >= 1.5x mp.Process
   and >= 1.2x the bare loop.
2. **Large results**, MiB/s: 16 results of 64 MiB each (``bytes`` and numpy uint64 arrays)
   returned to the parent by pools of 2 workers: ForkPool against ``multiprocessing.Pool``
   (fork), ``ProcessPoolExecutor`` (fork), loky, mpire (fork) and pebble (fork) when
   installed; see ``_pool_peers.py``.  Every result is checked (bytes: length and five
   words; numpy: the full sum) and dropped before the next; the check is inside the timed
   region, so a zero-copy numpy result pays its page faults there.  Floor rows: the child
   makes the result and returns None; the child makes it, ``pwrite``s it into a new shm
   object and returns None (the floor of a child writing shared memory).  2b: zero-copy
   results, the child fills ``ipcfork.result_buffer(64 MiB)`` in place and returns it (the
   parent gets a read-only memoryview; five words checked, or every word read).  Targets:
   ForkPool >= 5x mp.Pool and >= 3x the best of loky, mpire and ProcessPoolExecutor; the
   zero-copy row >= 5x mp.Pool bytes and >= 0.6x the shm floor.
3. **Child exit to future resolved**, microseconds: the child returns
   ``time.monotonic_ns()`` as its result and the parent stamps the same clock in a done
   callback (ForkPool(1), one task at a time).  Reference: a bare fork whose child writes its
   stamp to a shared page right before ``os._exit(0)`` while the parent blocks in
   ``os.waitpid``; an extra row polls the child's pidfd first (ForkPool's mechanism).
   Target: ForkPool median < 1.3x the blocking waitpid median.
4. **Fork rate against parent heap size** (0, 256 MiB, 1 GiB: a bytearray touched page by
   page): ForkPool(2) tasks/s and the bare loop's forks/s, with the time the parent spends
   inside ``os.fork()`` (page-table copy), plus ``ForkPool(2, zygote=True)`` (children
   forked from a small helper made with the pool, before the heap grew) where available.
   A second table (``_heap_hugepages.py``): a parent holding a 1 GiB bytearray and
   2,000,000 small strings, each repetition in fresh interpreters: ForkPool(2) with no
   option, ``ForkPool(2, zygote=True)`` made after the data loaded, and ForkPool(2) after
   transparent huge pages (``hugepages=True``, or ``collapse_hugepages()`` before the pool);
   the small-heap ForkPool(2) rate is the reference.  Target: small / huge pages <= 2.5x.
5. **Parent RSS over many tasks**: ForkPool(2).imap_unordered over 20,000 trivial tasks
   (2,000 with ``--quick``); VmRSS, open descriptors and threads at start, at 10 % and at
   the end.
6. **Persistent workers**, items/s: ``abs`` over 60,000 items through
   ``ForkPool(2, tasks_per_child=None).imap_unordered`` against
   ``multiprocessing.Pool(2).imap_unordered(chunksize=1)``, and over 1,000,000 items through
   ``map`` against ``multiprocessing.Pool(2).map`` (its default chunksize); every run makes
   its pool and warms it up on the same call before the clock, one pool alive at a time;
   an extra row forces ``chunksize=1`` (one task at a time) where this ipcfork batches
   short items by default.  Targets: imap_unordered >= 2.5x (both rows), map >= 1.2x.

Method: every variant is warmed up, then each repetition runs all variants once in
rotated order (round-robin), so machine noise hits all alike; tables show medians over
the repetitions and target lines add the range of the per-repetition ratios.  Each section
prints how many CPUs other processes kept busy meanwhile (noise indicator).
Optional modes get extra rows when this ipcfork accepts them (otherwise the rows are skipped
and the output says so): ``tasks_per_child=None`` (persistent workers) in sections 2 and 6,
``zygote=True`` in sections 1, 2 and 4.

Cleanup: the script compares the machine's IPC objects (SysV tables, /dev/shm, /dev/mqueue)
before and after, stops the resource trackers loky and multiprocessing leave running, and
checks no child is left.  Exit status: 0 when every result was right and nothing leaked, 1
otherwise (a missed performance target is reported, not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

import _heap_hugepages as big_parent
import _pool_latency as latency
import _pool_peers as peers
import _pool_persistent as persistent
from _common import CpuWatch, gc_off, markdown_table
from _pool_kit import MIB, PAGE, RunFailed, Variant, flush_std, ratio_line, run_reps

import ipcfork
from ipcfork import testing
from ipcfork.errors import InvalidArgumentError

perf_counter, monotonic_ns = time.perf_counter, time.monotonic_ns
MP = peers.MP


@dataclass(frozen=True)
class Config:
    reps: int  # repetitions of sections 1, 3, 4 and 6
    transfer_reps: int  # repetitions of section 2
    fork_tasks: int  # tasks per run in section 1
    results: int  # results per run in section 2
    result_size: int  # bytes per result in section 2
    samples: int  # latency samples per variant and repetition in section 3
    heap_seconds: float  # about this long per run in section 4 (count set by the bare loop)
    heaps_mib: tuple[int, ...]
    rss_tasks: int  # tasks in section 5
    imap_items: int  # items per imap_unordered run in section 6
    map_items: int  # items per map run in section 6


FULL = Config(reps=5, transfer_reps=3, fork_tasks=400, results=16, result_size=64 * MIB,
              samples=200, heap_seconds=1.0, heaps_mib=(0, 256, 1024), rss_tasks=20_000,
              imap_items=60_000, map_items=1_000_000)
QUICK = Config(reps=2, transfer_reps=1, fork_tasks=100, results=8, result_size=64 * MIB,
               samples=50, heap_seconds=0.3, heaps_mib=(0, 256, 1024), rss_tasks=2_000,
               imap_items=10_000, map_items=200_000)


# -- helpers (the conventions of bench_primitives.py) -------------------------------------








def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def environment_line() -> str:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as thp:
        hugepages = thp.read().split("[")[1].split("]")[0]
    ram = os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30
    libs = " ".join(f"{d} {version(d)}" for d in ("numpy", "loky", "mpire", "pebble"))
    return (
        f"environment: python {platform.python_version()} ({platform.python_implementation()})"
        f" | ipcfork {ipcfork.__version__} | {libs}"
        f" | nproc {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()})"
        f" | RAM {ram:.0f} GiB | THP {hugepages}"
        f" | kernel {platform.system()} {platform.release()} {platform.machine()}"
        f" | load {os.getloadavg()[0]:.2f}"
    )







@dataclass(frozen=True)
class Features:
    """Optional ForkPool modes this ipcfork runs (probed at start); rows for a missing one
    are skipped and the section says so."""

    persistent: bool  # tasks_per_child=None
    zygote: bool  # zygote=True

    @staticmethod
    def probe() -> Features:
        def works(**options: Any) -> bool:
            try:
                with ipcfork.ForkPool(1, **options) as pool:
                    return bool(pool.submit(abs, -3).result(timeout=60) == 3)
            except (InvalidArgumentError, TypeError):  # TypeError: no such option yet
                return False

        return Features(persistent=works(tasks_per_child=None), zygote=works(zygote=True))

    def skipped(self, *options: str) -> str:
        """A note for each of ``options`` (keyword=value as passed) this ipcfork refused."""
        ok = {"tasks_per_child=None": self.persistent, "zygote=True": self.zygote}
        return "".join(f"  ForkPool({option}) is refused by this ipcfork: its row is skipped."
                       for option in options if not ok[option])


# -- section 1: fork per task --------------------------------------------------------------


def small_task(i: int) -> int:
    return 2 * i + 1


def bare_loop(n: int, fork_time: list[float] | None = None) -> float:
    """Sequential fork / _exit(0) / waitpid, ``n`` times; forks per second.  ``fork_time``
    collects the seconds the parent spent inside ``os.fork()``."""
    fork, wait, exit_now = os.fork, os.waitpid, os._exit
    in_fork = 0.0
    with gc_off():
        start = perf_counter()
        for _ in range(n):
            t0 = perf_counter()
            pid = fork()
            if pid == 0:
                exit_now(0)
            in_fork += perf_counter() - t0
            _, status = wait(pid, 0)
            if status:
                raise RunFailed(f"bare fork child exited with status {status:#x}")
        elapsed = perf_counter() - start
    if fork_time is not None:
        fork_time.append(in_fork / n)
    return n / elapsed


def mp_process_loop(n: int) -> float:
    start = perf_counter()
    for i in range(n):
        process = MP.Process(target=small_task, args=(i,))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise RunFailed(f"multiprocessing.Process exit code {process.exitcode}")
        process.close()
    return n / (perf_counter() - start)


def pool_tasks(pool: ipcfork.ForkPool, n: int, imap: bool = False) -> list[int]:
    """``n`` small tasks through ``pool``; the results, checked."""
    if imap:
        results = sorted(pool.imap_unordered(small_task, range(n)))
    else:
        results = list(pool.map(small_task, range(n)))
    if results != [small_task(i) for i in range(n)]:
        raise RunFailed(f"ForkPool({pool.max_workers}) returned wrong results")
    return results


def forkpool_run(workers: int, n: int, imap: bool = False, **options: Any) -> float:
    """``n`` small tasks through a new ForkPool; tasks per second, pool creation and shutdown
    included."""
    start = perf_counter()
    with ipcfork.ForkPool(workers, **options) as pool:
        pool_tasks(pool, n, imap)
    return n / (perf_counter() - start)


def open_pool_run(pool: ipcfork.ForkPool, n: int, imap: bool = False) -> float:
    """``n`` small tasks through an existing pool; tasks per second."""
    start = perf_counter()
    pool_tasks(pool, n, imap)
    return n / (perf_counter() - start)


def warm_pool_run(workers: int, n: int, imap: bool = False, **options: Any) -> float:
    """``n`` small tasks through a new ForkPool made and warmed up (a task per worker)
    before the clock, as a user who keeps a pool would measure it; tasks per second.  Its
    shutdown is not timed."""
    with ipcfork.ForkPool(workers, **options) as pool:
        pool_tasks(pool, 2 * workers)
        return open_pool_run(pool, n, imap)


BARE, MP_PROCESS = "bare os.fork/_exit/waitpid loop", "multiprocessing.Process start+join"
OPEN_MAP = "ForkPool(2).map, pool started before the clock"
OPEN_IMAP = "ForkPool(2).imap_unordered, pool started before the clock"


def section_fork_rate(cfg: Config, features: Features) -> None:
    n = cfg.fork_tasks
    print(f"\n## 1. Fork per task, trivial task, {n} tasks per run (tasks/s, higher is "
          "better)\n")
    watch = CpuWatch()
    variants: list[Variant] = [
        (BARE, lambda: bare_loop(n)),
        (MP_PROCESS, lambda: mp_process_loop(n)),
        (OPEN_MAP, lambda: warm_pool_run(2, n)),
        (OPEN_IMAP, lambda: warm_pool_run(2, n, imap=True)),
        ("ForkPool(1).map, pool made in the clock", lambda: forkpool_run(1, n)),
        ("ForkPool(2).map, pool made in the clock", lambda: forkpool_run(2, n)),
        ("ForkPool(2).imap_unordered, pool made in the clock",
         lambda: forkpool_run(2, n, imap=True)),
    ]
    if features.zygote:
        variants.append(("ForkPool(2, zygote=True).map, pool started before the clock",
                         lambda: warm_pool_run(2, n, zygote=True)))
    rates = run_reps(variants, cfg.reps)
    med = {label: statistics.median(r) for label, r in rates.items()}
    rows = [(label, f"{med[label]:,.0f}/s", f"{min(r):,.0f}..{max(r):,.0f}",
             f"{med[label] / med[BARE]:.2f}x", f"{med[label] / med[MP_PROCESS]:.2f}x")
            for label, r in rates.items()]
    print(markdown_table(("variant", "median tasks/s", "range", "vs bare loop",
                          "vs mp.Process"), rows))
    print(f"\n{cfg.reps} repetitions; 'started before the clock': the pool is made and runs "
          "a task per worker first, its shutdown is not timed (as a user keeping a pool "
          "measures it); 'made in the clock' rows include creating and shutting down the "
          "pool; the bare loop and mp.Process run one child at a time and return nothing; "
          f"other processes kept {watch.background():.2f} CPUs busy meanwhile."
          + features.skipped("zygote=True") + "\n")
    print(ratio_line(f"{OPEN_MAP} / mp.Process", rates[OPEN_MAP], rates[MP_PROCESS], 1.5))
    print(ratio_line(f"{OPEN_MAP} / bare loop", rates[OPEN_MAP], rates[BARE], 1.2))


# -- section 2: large results ------------------------------------------------------------


def section_transfer(cfg: Config, features: Features) -> None:
    peers.section_transfer(cfg.results, cfg.result_size, cfg.transfer_reps,
                           features.persistent, features.zygote,
                           features.skipped("tasks_per_child=None"))


# -- section 3: child exit to future resolved ------------------------------------------------


def section_latency(cfg: Config, _features: Features) -> None:
    latency.section_latency(cfg.reps, cfg.samples)


# -- section 4: fork rate against heap size ----------------------------------------------------


def vm_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def grow_heap(mib: int) -> bytearray:
    """``mib`` MiB of private heap, every page written (so the parent really owns it)."""
    heap = bytearray(mib * MIB)
    heap[::PAGE] = b"\x01" * (len(heap) // PAGE)
    return heap


ZYGOTE = "ForkPool(2, zygote=True)"


def section_heap(cfg: Config, features: Features) -> None:
    print("\n## 4. Fork per task against the parent's heap size (tasks/s, higher is better)\n")
    watch = CpuWatch()
    rows = []
    for mib in cfg.heaps_mib:
        with contextlib.ExitStack() as stack:
            if features.zygote:  # made before the heap grows, as its documentation asks
                zygote_pool = stack.enter_context(ipcfork.ForkPool(2, zygote=True))
            heap = grow_heap(mib)
            stack.callback(heap.clear)
            rss = vm_rss_kib() / 1024
            n = max(20, int(bare_loop(20) * cfg.heap_seconds))  # warm-up; sizes the runs
            fork_time: list[float] = []
            variants: list[Variant] = [
                (BARE, functools.partial(bare_loop, n, fork_time)),
                ("ForkPool(2)", functools.partial(forkpool_run, 2, n))]
            if features.zygote:
                variants.append((ZYGOTE, functools.partial(open_pool_run, zygote_pool, n)))
            rates = run_reps(variants, cfg.reps)
        bare = statistics.median(rates[BARE])
        row = [f"{mib:,} MiB (VmRSS {rss:,.0f} MiB)", f"{n}", f"{bare:,.0f}/s",
               f"{statistics.median(fork_time) * 1e3:.2f} ms"]
        for label, _ in variants[1:]:
            paired = [a / b for a, b in zip(rates[label], rates[BARE], strict=True)]
            rate = statistics.median(rates[label])
            row += [f"{rate:,.0f}/s",
                    f"{rate / bare:.2f}x ({min(paired):.2f}..{max(paired):.2f})"]
        rows.append(tuple(row))
    header = ["parent heap", "tasks per run", "bare loop", "parent in os.fork()",
              "ForkPool(2)", "ForkPool(2) / bare"]
    if features.zygote:
        header += [ZYGOTE, "zygote / bare"]
    print(markdown_table(tuple(header), rows))
    print(f"\n{cfg.reps} repetitions per heap size; heap = one bytearray with every page "
          "written; 'parent in os.fork()' is the bare loop's median time inside the call "
          "(page-table copy).  ForkPool(2) forks from the parent, so its rate falls with the "
          "heap as the bare loop's does; "
          + (f"the {ZYGOTE} pool is made before the heap grows and kept across the "
             "repetitions (its creation is not timed); every task's child is forked from "
             "its small helper process; " if features.zygote else
             "zygote mode (forking from a small helper) is refused by this ipcfork: "
             "not measured; ")
          + f"other processes kept {watch.background():.2f} CPUs busy meanwhile.")
    print("\n### 4b. A 1 GiB bytearray and 2,000,000 small strings in the parent: plain, "
          "zygote made after the data, transparent huge pages (tasks/s, higher is better)\n")
    try:
        big_parent.section_big_parent(cfg.reps, cfg.heap_seconds)
    except big_parent.LabFailed as exc:
        raise RunFailed(f"section 4b: {exc}") from exc


# -- section 5: parent RSS over many tasks -------------------------------------------------


def section_rss(cfg: Config, _features: Features) -> None:
    n = cfg.rss_tasks
    print(f"\n## 5. Parent memory over {n:,} fork-per-task tasks, ForkPool(2).imap_unordered\n")
    gc.collect()
    points: list[tuple[str, int, int, int, int]] = []

    def mark(label: str, done: int) -> None:
        points.append((label, done, vm_rss_kib(), len(os.listdir("/proc/self/fd")),
                       len(os.listdir("/proc/self/task"))))

    mark("before the pool", 0)
    total, done = 0, 0
    flush_std()
    start = perf_counter()
    with ipcfork.ForkPool(2) as pool:
        mark("pool made, no task yet", 0)
        for result in pool.imap_unordered(small_task, range(n)):
            total += result
            done += 1
            if done == max(1, n // 10):
                mark("10 % done", done)
        mark("all done, pool open", done)
    elapsed = perf_counter() - start
    gc.collect()
    mark("after shutdown", done)
    if total != sum(small_task(i) for i in range(n)):
        raise RunFailed("section 5: wrong results")
    rows = [(label, f"{d:,}", f"{rss / 1024:,.1f}", f"{fds}", f"{threads}")
            for label, d, rss, fds, threads in points]
    print(markdown_table(("point", "tasks done", "VmRSS MiB", "open fds", "threads"), rows))
    tenth, end = points[2], points[3]
    per_k = (end[2] - tenth[2]) / max(1, end[1] - tenth[1]) * 1000
    print(f"\n{n / elapsed:,.0f} tasks/s. Growth: {(end[2] - points[1][2]) / 1024:+.1f} MiB "
          f"from the first task to the last, {(end[2] - tenth[2]) / 1024:+.1f} MiB from 10 % "
          f"to the end ({per_k:+.1f} KiB per 1,000 tasks).")


# -- section 6: persistent workers, many small tasks ----------------------------------------


def section_persistent(cfg: Config, features: Features) -> None:
    if not features.persistent:
        print(features.skipped("tasks_per_child=None"))
        return
    persistent.section_persistent(cfg.reps, cfg.imap_items, cfg.map_items)


# -- main -----------------------------------------------------------------------------------


def stop_resource_trackers() -> list[str]:
    """loky (and multiprocessing, started by loky) leave a resource-tracker process running
    until the interpreter exits; stop them so the child check below means something."""
    stopped = []
    for name in ("loky.backend.resource_tracker", "multiprocessing.resource_tracker"):
        tracker = getattr(sys.modules.get(name), "_resource_tracker", None)
        pid = getattr(tracker, "_pid", None)
        if tracker is not None and pid is not None:
            with contextlib.suppress(Exception):
                tracker._stop()
                stopped.append(f"{name.split('.')[0]} ({pid})")
    return stopped


SECTIONS = {1: section_fork_rate, 2: section_transfer, 3: section_latency, 4: section_heap,
            5: section_rss, 6: section_persistent}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    parser.add_argument("--reps", type=int, help="repetitions of sections 1, 3, 4 and 6")
    parser.add_argument("--transfer-reps", type=int, help="repetitions of section 2")
    parser.add_argument("--only", default="1,2,3,4,5,6", help="sections to run, e.g. 1,3")
    parser.add_argument("--rss-tasks", type=int, help="tasks in section 5 (default 20,000)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.reps is not None:
        cfg = replace(cfg, reps=max(1, args.reps))
    if args.transfer_reps is not None:
        cfg = replace(cfg, transfer_reps=max(1, args.transfer_reps))
    if args.rss_tasks is not None:
        cfg = replace(cfg, rss_tasks=max(10, args.rss_tasks))
    sections = sorted({int(s) for s in args.only.split(",")} & set(SECTIONS))

    print(environment_line())
    print(f"mode: {'quick' if args.quick else 'full'}, {cfg.reps} repetitions "
          f"({cfg.transfer_reps} in section 2), variants interleaved round-robin, "
          "medians reported")
    before = testing.snapshot()
    began = time.monotonic()
    ok = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            features = Features.probe()
            for number in sections:
                SECTIONS[number](cfg, features)
                flush_std()
            ok = True
        except (RunFailed, peers.BadResult) as exc:
            print(f"\nFAILED: {exc}")
    gc.collect()
    trackers = stop_resource_trackers()
    leaked = testing.snapshot() - before
    left = testing.children()
    kinds = sorted({f"{w.category.__name__}: {str(w.message)[:100]}" for w in caught})
    print(f"\nwarnings raised during the run: {len(caught)}"
          + "".join(f"\n- {k}" for k in kinds))
    print(f"cleanup: new IPC objects: {leaked.describe()}; resource trackers stopped: "
          f"{', '.join(trackers) or 'none'}; child processes left: {left or 'none'}; "
          f"total time {time.monotonic() - began:.0f} s; load average now "
          f"{os.getloadavg()[0]:.2f}")
    return 0 if ok and not leaked and not left else 1


if __name__ == "__main__":
    sys.exit(main())
