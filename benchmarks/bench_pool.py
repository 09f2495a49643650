"""Benchmark ipcfork.ForkPool (a fresh forked child per task) against bare fork, the standard
library and other process pools.

Run from the repository root::

    python benchmarks/bench_pool.py            # full: ~5.5 min on 2 cores
    python benchmarks/bench_pool.py --quick    # smoke run: ~1 min

Options: ``--reps N`` (repetitions of sections 1, 3, 4), ``--transfer-reps N`` (section 2),
``--only 1,3`` (a subset of the sections).

What is measured
----------------
1. **Fork per task**, tasks/s, a trivial task returning a small int, N tasks per run:
   ``ForkPool(1)`` and ``ForkPool(2)`` (``map``, pool creation and shutdown included, and
   ``imap_unordered``) against a sequential bare ``os.fork()`` / ``os._exit(0)`` /
   ``os.waitpid`` loop and sequential ``multiprocessing.Process`` (fork context) start +
   join.  Targets: ForkPool >= 0.8x the bare loop and >= 1.5x mp.Process.
2. **Large results**, MiB/s: 16 results of 64 MiB each (``bytes`` and numpy uint64 arrays)
   returned to the parent by pools of 2 workers: ForkPool against ``multiprocessing.Pool``
   (fork), ``ProcessPoolExecutor`` (fork), loky, mpire (fork) and pebble (fork); see
   ``_pool_peers.py``.  Every result is checked (bytes: length and five words; numpy: the
   full sum) and dropped before the next; the check is inside the timed region, so a
   zero-copy numpy result pays its page faults there.  A floor row runs the production
   alone (the child makes the result and returns None).  Targets: ForkPool >= 5x mp.Pool
   and >= 3x the best of loky, mpire and ProcessPoolExecutor.
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
5. **Parent RSS over many tasks**: ForkPool(2).imap_unordered over 20,000 trivial tasks
   (2,000 with ``--quick``); VmRSS, open descriptors and threads at start, at 10 % and at
   the end.

Method: every variant is warmed up, then each repetition runs all variants once in
rotated order (round-robin), so machine noise hits all alike; tables show medians over
the repetitions and target lines add the range of the per-repetition ratios.  Each section
prints how many CPUs other processes kept busy meanwhile (noise indicator).
Optional modes get extra rows when this ipcfork accepts them (otherwise the rows are skipped
and the output says so): ``tasks_per_child=None`` (persistent workers) in sections 1 and 2,
``zygote=True`` in sections 1 and 4.

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
import mmap
import os
import platform
import queue
import select
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

import _pool_peers as peers
from _common import CpuWatch, gc_off, markdown_table, rotated, verdict

import ipcfork
from ipcfork import testing
from ipcfork.errors import InvalidArgumentError

Variant = tuple[str, Callable[[], float]]  # (label, one timed run returning its figure)
perf_counter, monotonic_ns = time.perf_counter, time.monotonic_ns
MP = peers.MP
PAGE = mmap.PAGESIZE
MIB = 1 << 20


@dataclass(frozen=True)
class Config:
    reps: int  # repetitions of sections 1, 3 and 4
    transfer_reps: int  # repetitions of section 2
    fork_tasks: int  # tasks per run in section 1
    results: int  # results per run in section 2
    result_size: int  # bytes per result in section 2
    samples: int  # latency samples per variant and repetition in section 3
    heap_seconds: float  # about this long per run in section 4 (count set by the bare loop)
    heaps_mib: tuple[int, ...]
    rss_tasks: int  # tasks in section 5
    stream_tasks: int  # tasks per run in section 6


FULL = Config(reps=5, transfer_reps=3, fork_tasks=400, results=16, result_size=64 * MIB,
              samples=200, heap_seconds=1.0, heaps_mib=(0, 256, 1024), rss_tasks=20_000,
              stream_tasks=20_000)
QUICK = Config(reps=2, transfer_reps=1, fork_tasks=100, results=8, result_size=64 * MIB,
               samples=50, heap_seconds=0.3, heaps_mib=(0, 256, 1024), rss_tasks=2_000,
               stream_tasks=4_000)


class RunFailed(Exception):
    """A run went wrong: a wrong result or a child that failed."""


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







def flush_std() -> None:
    """Children that flush inherited stdio buffers (multiprocessing) must find them empty."""
    sys.stdout.flush()
    sys.stderr.flush()


def ratio_line(what: str, num: list[float], den: list[float], limit: float,
               higher_is_better: bool = True) -> str:
    ratio = statistics.median(num) / statistics.median(den)
    paired = [a / b for a, b in zip(num, den, strict=True)]
    ok = ratio >= limit if higher_is_better else ratio < limit
    sign = ">=" if higher_is_better else "<"
    return (f"- target: {what} = {ratio:.2f}x (per-repetition {min(paired):.2f}x.."
            f"{max(paired):.2f}x), target {sign} {limit}x: {verdict(ok)}")


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


def run_reps(variants: list[Variant], reps: int,
             warmup: bool = True) -> dict[str, list[float]]:
    """Warm every variant up once, then ``reps`` round-robin repetitions; samples by label."""
    if warmup:
        for _, run in variants:
            flush_std()
            run()
    samples: dict[str, list[float]] = {label: [] for label, _ in variants}
    for rep in range(reps):
        for label, run in rotated(variants, rep):
            flush_std()
            samples[label].append(run())
    return samples


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


def open_pool_run(pool: ipcfork.ForkPool, n: int) -> float:
    """``n`` small tasks through an existing pool; tasks per second."""
    start = perf_counter()
    pool_tasks(pool, n)
    return n / (perf_counter() - start)


BARE, MP_PROCESS = "bare os.fork/_exit/waitpid loop", "multiprocessing.Process start+join"


def section_fork_rate(cfg: Config, features: Features) -> None:
    n = cfg.fork_tasks
    print(f"\n## 1. Fork per task, trivial task, {n} tasks per run (tasks/s, higher is "
          "better)\n")
    watch = CpuWatch()
    variants: list[Variant] = [
        (BARE, lambda: bare_loop(n)),
        (MP_PROCESS, lambda: mp_process_loop(n)),
        ("ForkPool(1).map", lambda: forkpool_run(1, n)),
        ("ForkPool(2).map", lambda: forkpool_run(2, n)),
        ("ForkPool(1).imap_unordered", lambda: forkpool_run(1, n, imap=True)),
        ("ForkPool(2).imap_unordered", lambda: forkpool_run(2, n, imap=True)),
    ]
    if features.zygote:
        variants.append(("ForkPool(2, zygote=True).map",
                         lambda: forkpool_run(2, n, zygote=True)))
    if features.persistent:
        variants.append(("ForkPool(2, tasks_per_child=None).map (persistent)",
                         lambda: forkpool_run(2, n, tasks_per_child=None)))
    rates = run_reps(variants, cfg.reps)
    med = {label: statistics.median(r) for label, r in rates.items()}
    rows = [(label, f"{med[label]:,.0f}/s", f"{min(r):,.0f}..{max(r):,.0f}",
             f"{med[label] / med[BARE]:.2f}x", f"{med[label] / med[MP_PROCESS]:.2f}x")
            for label, r in rates.items()]
    print(markdown_table(("variant", "median tasks/s", "range", "vs bare loop",
                          "vs mp.Process"), rows))
    print(f"\n{cfg.reps} repetitions; ForkPool rows include creating and shutting down the "
          "pool; the bare loop and mp.Process run one child at a time and return nothing; "
          f"other processes kept {watch.background():.2f} CPUs busy meanwhile."
          + features.skipped("zygote=True", "tasks_per_child=None") + "\n")
    for label in ("ForkPool(1).map", "ForkPool(2).map"):
        print(ratio_line(f"{label} / bare loop", rates[label], rates[BARE], 0.8))
        print(ratio_line(f"{label} / mp.Process", rates[label], rates[MP_PROCESS], 1.5))


# -- section 2: large results ------------------------------------------------------------


def section_transfer(cfg: Config, features: Features) -> None:
    count, size = cfg.results, cfg.result_size
    print(f"\n## 2. {count} results of {size // MIB} MiB returned to the parent, 2 workers "
          "(MiB/s, higher is better)\n")
    watch = CpuWatch()
    variants = peers.transfer_variants(features.persistent)
    kinds = ("bytes", "numpy")
    runs: list[Variant] = []
    for kind in kinds:
        for v in variants:
            runs.append((f"{kind}|{v.label}",
                         functools.partial(peers.run_transfer, v, kind, count, size)))
    for kind in kinds:  # warm-up: a quarter of the results, each variant once
        for v in variants:
            flush_std()
            peers.run_transfer(v, kind, max(2, count // 4), size)
    rates = run_reps(runs, cfg.transfer_reps, warmup=False)
    med = {key: statistics.median(r) for key, r in rates.items()}
    rows = []
    for v in variants:
        cells: list[str] = [v.label]
        for kind in kinds:
            rate = med[f"{kind}|{v.label}"]
            cells += [f"{rate:,.0f}", f"{rate / med[f'{kind}|{peers.MP_POOL}']:.2f}x"]
        rows.append(tuple(cells))
    print(markdown_table(("variant", "bytes MiB/s", "vs mp.Pool", "numpy MiB/s",
                          "vs mp.Pool"), rows))
    print(f"\n{cfg.transfer_reps} repetitions after a warm-up; the clock runs from the first "
          "submit to the last result checked (pool creation and warm-up excluded); "
          f"other processes kept {watch.background():.2f} CPUs busy meanwhile."
          + features.skipped("tasks_per_child=None") + "\n")
    for kind in kinds:
        mine = rates[f"{kind}|{peers.FORKPOOL}"]
        print(ratio_line(f"{kind}: ForkPool / mp.Pool", mine, rates[f"{kind}|{peers.MP_POOL}"],
                         5.0))
        peer_rates = {label: med[f"{kind}|{label}"] for label in peers.PEERS}
        best = max(peer_rates, key=peer_rates.__getitem__)
        print(ratio_line(f"{kind}: ForkPool / best of loky, mpire, PPE ({best.split('(')[0]})",
                         mine, rates[f"{kind}|{best}"], 3.0))


# -- section 3: child exit to future resolved ------------------------------------------------


def latency_forkpool(n: int) -> list[float]:
    """Microseconds from the child's stamp (its result) to the done callback's stamp."""
    stamps: queue.SimpleQueue[int] = queue.SimpleQueue()

    def on_done(_future: Any) -> None:
        stamps.put(monotonic_ns())

    out: list[float] = []
    with ipcfork.ForkPool(1) as pool, gc_off():
        for _ in range(n):
            future = pool.submit(monotonic_ns)
            early = future.done()  # resolved before the callback was added: not a sample
            future.add_done_callback(on_done)
            resolved = stamps.get(timeout=60)
            child = future.result()
            record = future.record
            if record.exitcode != 0 or record.pid is None:
                raise RunFailed(f"ForkPool child record {record}")
            if not early:
                out.append((resolved - child) / 1e3)
    return out


def latency_bare(n: int, page: memoryview, pidfd: bool) -> list[float]:
    """Microseconds from the child's stamp (shared page, then ``_exit``) to the parent's
    return from ``os.waitpid`` (after polling the child's pidfd when ``pidfd``)."""
    out: list[float] = []
    with gc_off():
        for _ in range(n):
            page[0] = 0
            pid = os.fork()
            if pid == 0:
                page[0] = monotonic_ns()
                os._exit(0)
            if pidfd:
                fd = os.pidfd_open(pid)
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.poll()
                os.close(fd)
            _, status = os.waitpid(pid, 0)
            now = monotonic_ns()
            if status or page[0] == 0:
                raise RunFailed(f"bare child status {status:#x}, stamp {page[0]}")
            out.append((now - page[0]) / 1e3)
    return out


WAITPID = "bare fork, parent blocks in os.waitpid"


def section_latency(cfg: Config, _features: Features) -> None:
    n = cfg.samples
    print(f"\n## 3. Child exit to future resolved ({n} samples per variant and repetition, "
          "microseconds, lower is better)\n")
    watch = CpuWatch()
    area = mmap.mmap(-1, PAGE)  # anonymous and shared with forked children
    page = memoryview(area).cast("Q")
    all_samples: dict[str, list[float]] = {}

    def variant(label: str, measure: Callable[[], list[float]]) -> Variant:
        all_samples[label] = []

        def run() -> float:
            samples = measure()
            all_samples[label].extend(samples)
            return statistics.median(samples)

        return label, run

    forkpool = "ForkPool(1), child returns its stamp, parent stamps in a done callback"
    variants = [
        variant(forkpool, lambda: latency_forkpool(n)),
        variant(WAITPID, lambda: latency_bare(n, page, pidfd=False)),
        variant("bare fork, parent polls a pidfd, then os.waitpid",
                lambda: latency_bare(n, page, pidfd=True)),
    ]
    for label, run in variants:  # warm-up, not kept
        run()
        all_samples[label].clear()
    medians = run_reps(variants, cfg.reps, warmup=False)
    page.release()
    area.close()
    ref = statistics.median(medians[WAITPID])
    rows = []
    for label, meds in medians.items():
        s = sorted(all_samples[label])
        q = statistics.quantiles(s, n=10)
        rows.append((label, f"{statistics.median(meds):,.0f}", f"{q[0]:,.0f}", f"{q[-1]:,.0f}",
                     f"{s[-1]:,.0f}", f"{statistics.median(meds) / ref:.2f}x"))
    print(markdown_table(("variant", "median us", "p10", "p90", "max", "vs waitpid"), rows))
    dropped = cfg.reps * n - len(all_samples[forkpool])
    print(f"\nmedian of the {cfg.reps} per-repetition medians; p10/p90/max over all samples; "
          f"CLOCK_MONOTONIC (time.monotonic_ns) on both sides; {dropped} ForkPool sample(s) "
          "dropped (future resolved before its callback was added); other processes kept "
          f"{watch.background():.2f} CPUs busy meanwhile.\n")
    print(ratio_line("ForkPool / blocking waitpid (median latency)", medians[forkpool],
                     medians[WAITPID], 1.3, higher_is_better=False))


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


def stream_run(stream: Callable[[Callable[[int], int], range], Any], n: int) -> float:
    """``n`` small tasks through an open pool's ``stream``; tasks per second, checked."""
    start = perf_counter()
    results = sorted(stream(small_task, range(n)))
    rate = n / (perf_counter() - start)
    if results != [small_task(i) for i in range(n)]:
        raise RunFailed("a persistent pool returned wrong results")
    return rate


def section_persistent(cfg: Config, features: Features) -> None:
    n = cfg.stream_tasks
    print(f"\n## 6. Persistent workers, {n:,} trivial tasks per run through an open pool of 2 "
          "(tasks/s, higher is better)\n")
    if not features.persistent:
        print(features.skipped("tasks_per_child=None"))
        return
    watch = CpuWatch()
    mp_imap = "multiprocessing.Pool(2).imap_unordered, chunksize=1"
    mp_map = "multiprocessing.Pool(2).map"
    with ipcfork.ForkPool(2, tasks_per_child=None) as pool, MP.Pool(2) as mp_pool:
        variants: list[Variant] = [
            ("ForkPool(2, tasks_per_child=None).imap_unordered",
             lambda: stream_run(pool.imap_unordered, n)),
            (mp_imap, lambda: stream_run(
                lambda fn, items: mp_pool.imap_unordered(fn, items, chunksize=1), n)),
            ("ForkPool(2, tasks_per_child=None).map", lambda: stream_run(pool.map, 20 * n)),
            (mp_map, lambda: stream_run(mp_pool.map, 20 * n)),
        ]
        rates = run_reps(variants, cfg.reps)
    med = {label: statistics.median(r) for label, r in rates.items()}
    rows = [(label, f"{med[label]:,.0f}/s", f"{min(r):,.0f}..{max(r):,.0f}",
             f"{med[label] / med[mp_imap]:.2f}x") for label, r in rates.items()]
    print(markdown_table(("variant", "median tasks/s", "range", "vs mp imap_unordered"),
                         rows))
    print(f"\n{cfg.reps} repetitions, pools opened once; map rows run {20 * n:,} tasks; "
          "other processes kept "
          f"{watch.background():.2f} CPUs busy meanwhile.\n")
    print(ratio_line("ForkPool imap_unordered / mp.Pool imap_unordered chunksize=1",
                     rates["ForkPool(2, tasks_per_child=None).imap_unordered"],
                     rates[mp_imap], 2.0))
    print(ratio_line("ForkPool map / mp.Pool map", rates["ForkPool(2, tasks_per_child=None).map"],
                     rates[mp_map], 1.0))


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
    parser.add_argument("--reps", type=int, help="repetitions of sections 1, 3 and 4")
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
