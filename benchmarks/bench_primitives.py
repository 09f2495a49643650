"""Benchmark ipcfork's locks against multiprocessing, raw sysv_ipc / posix_ipc and flock.

Run from the repository root::

    python benchmarks/bench_primitives.py                  # full: ~2.5 min on 2 quiet cores
    python benchmarks/bench_primitives.py --quick          # smoke run: ~20 s
    IPCFORK_PURE=1 python benchmarks/bench_primitives.py   # on the ctypes fallback: ~5 min

Options: ``--reps N`` (repetitions), ``-k N`` (increments per child), ``--retries N``
(extra attempts for a contended run disturbed by other processes; see below), ``--spins
LIST`` (the spin counts section 3 compares, e.g. ``0,100,2000``; ``none`` skips it),
``--only LIST`` (run only these sections, e.g. ``--only 3 --reps 15`` for the spin count).

The environment line names the native core's path in use (``ipcfork._os.native.PATH``:
"compiled", the C extension, or "ctypes", the fallback chosen by ``IPCFORK_PURE=1`` or
when the extension is not built) and why (``ipcfork._os.native.WHY``): the two differ
several-fold, so a figure means nothing without it.

What is measured
----------------
1. **Uncontended acquire + release**, in nanoseconds per pair, one process: ipcfork
   ``Mutex`` (posix backend, the default: a robust process-shared pthread mutex whose
   methods are C on the compiled path; and the sysv backend), ``multiprocessing.Lock``
   (the peer), raw ``sysv_ipc.Semaphore`` with ``undo=True``, raw ``posix_ipc.Semaphore``,
   ``fcntl.flock`` (LOCK_EX / LOCK_UN on a temporary file) and ipcfork ``Semaphore`` (both
   backends); each as ``acquire()`` then ``release()`` through bound methods, and the
   Mutexes and ``multiprocessing.Lock`` also as ``with lock: pass``.  Each variant runs a
   timeit-style loop (bound methods in locals, garbage collector off) whose length is
   calibrated once per variant; within a repetition a variant keeps the best of 3 slices
   of that loop (timeit's advice: slower slices measure interruptions).  The loop's own
   cost (printed) is included in every figure.  Ratios are to ``multiprocessing.Lock``'s
   acquire + release.  Targets:

   - posix ``Mutex`` ``acquire()`` + ``release()`` / ``multiprocessing.Lock``'s: <= 1.2x;
   - posix ``Mutex`` ``with lock: pass`` / ``multiprocessing.Lock``'s ``with``: <= 1.0x;
   - sysv ``Mutex`` ``acquire()`` + ``release()`` / raw ``sysv_ipc.Semaphore``
     (``undo=True``)'s: <= 1.3x.
2. **Two contending processes**, in increments per second: two forked children each run
   ``with lock: counter[0] += 1`` K times on a 64-bit counter in shared memory.  Both
   children park on a pipe until the parent writes the start signal, then meet at a
   barrier (a flag per child in shared memory, spun on with ``sched_yield``), because the
   second child often runs milliseconds after the first.  The wall time runs from the
   moment the barrier opened to the later of the two children's finish stamps
   (``perf_counter`` is CLOCK_MONOTONIC, comparable across processes), so fork, wake-up
   and exit costs are excluded.  Each child is reaped with ``os.waitpid``; a child that
   fails or hangs (120 s) aborts the benchmark.
   Variants: ipcfork ``Mutex`` (posix, the default, and sysv), ``multiprocessing.Value('q')``
   with its own ``get_lock()`` (``with v.get_lock(): v.value += 1``; an RLock; the
   reference), ``multiprocessing.RawValue`` + ``multiprocessing.Lock``, raw posix_ipc /
   sysv_ipc (``undo=True``) semaphores and an unguarded counter (whose lost updates are
   reported).  Every guarded run's final count is checked against 2 * K.  Target: the
   default Mutex at least 3x the reference.
3. **Spin count** (compiled path only; the ctypes fallback never spins): section 2's
   default-Mutex run with ``ipcfork._os.native._impl.set_spin(n)`` set before the children
   fork, for each n of ``--spins`` (default 0, 50, 100, 400, 2000; the library's default
   is ``ipcfork._os.native.SPINS``, 100 on more than one CPU), beside the same reference, in
   the same round-robin.  A contended compiled ``acquire`` polls the lock word that many
   times (with a pause instruction) before it sleeps on the futex.

Method: every variant is warmed up, then each repetition runs all variants once in
rotated order (round-robin), so machine noise hits all alike; tables show medians over
the repetitions, and the target lines add the range of the per-repetition ratios.

Noise: with two contenders on two CPUs, any other busy process changes the regime (the
children then share one CPU and hardly contend), and rates move by 2-3x.  The script
therefore measures how many CPUs other processes kept busy (``/proc/stat`` minus its own
and its children's CPU time) and prints it; a contended run during which that exceeded
0.25 CPU gets one more attempt (``--retries``), keeping the quieter one, and a warning
counts the runs that stayed disturbed.  Section 1 prints the same measure for its whole
duration.

Cleanup: every IPC object is removed before exit (raw POSIX semaphores are unlinked right
after creation, raw SysV ones removed at the end), and the script checks that
``/proc/sysvipc`` and ``/dev/shm`` hold nothing new of the kinds it makes and that no
child is left.  Exit status: 0 when every count is right and nothing leaked, 1 otherwise
(a missed performance target is reported, not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import itertools
import multiprocessing
import os
import platform
import re
import select
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any

import posix_ipc
import sysv_ipc
from _common import CpuWatch, core_path, gc_off, markdown_table, rotated, verdict

import ipcfork
from ipcfork import testing
from ipcfork._os import native as _native

Timer = Callable[[int], float]  # runs a loop of n iterations, returns seconds
Body = Callable[[int], None]  # a child's work: k guarded increments
# Makes a contended variant's lock and counter (cleaned up by the stack); returns the
# children's body and a reader of the final count.
Setup = Callable[[ExitStack], tuple[Body, Callable[[], int]]]
perf_counter = time.perf_counter
MP = multiprocessing.get_context("fork")  # fork: SemLocks are unlinked at birth


@dataclass(frozen=True)
class Config:
    reps: int  # measured repetitions (round-robin over the variants)
    pair_seconds: float  # target duration of one uncontended timing
    k: int  # increments per child in the contended runs
    retries: int  # extra attempts for a contended run disturbed by other processes
    spins: tuple[int, ...] = (0, 50, 100, 400, 2000)  # section 3's spin counts
    child_timeout: float = 120.0  # seconds before a contended run is declared hung


FULL = Config(reps=7, pair_seconds=0.2, k=200_000, retries=1)
QUICK = Config(reps=3, pair_seconds=0.1, k=50_000, retries=1)
SUB_RUNS = 3  # an uncontended timing keeps the best of this many equal slices
QUIET = 0.25  # CPUs busy with other processes above which a contended run is disturbed


# -- helpers ----------------------------------------------------------------------------


def environment_line() -> str:
    affinity = len(os.sched_getaffinity(0))
    return (
        f"environment: python {platform.python_version()} ({platform.python_implementation()})"
        f" | ipcfork {ipcfork.__version__} | sysv_ipc {sysv_ipc.VERSION}"
        f" | posix_ipc {posix_ipc.VERSION} | nproc {affinity} (cpu_count {os.cpu_count()})"
        f" | kernel {platform.system()} {platform.release()} {platform.machine()}"
        f" | load {os.getloadavg()[0]:.2f}"
        f" | {core_path()}, spin count {_native.SPINS}"
    )


_PID_TAG = re.compile(r"ipcfork[^.]*\.(\d+)\.")  # ipcfork names carry their creator's pid
# posix_ipc's generated names (``Semaphore(None, ...)``): lower-case letters only
_POSIX_IPC_RANDOM = re.compile(r"(sem\.)?[a-z]+")


def own_ipc_objects() -> set[str]:
    """IPC objects on the machine that this run could have made.

    Everything this script creates is anonymous: SysV objects are IPC_PRIVATE (key 0;
    for shared memory, made by this process) and POSIX ones live in /dev/shm, named
    either by ipcfork (tagged with this process's pid; other pids are skipped) or by
    posix_ipc (lower-case letters only); other names belong to other programs.  Other
    processes' IPC_PRIVATE semaphores cannot be told apart, so compare a listing from
    before with one after.
    """
    me = os.getpid()
    found = set()
    for kind in ("sem", "shm", "msg"):
        with open(f"/proc/sysvipc/{kind}") as table:
            header = next(table).split()
            for line in table:
                row = dict(zip(header, line.split(), strict=False))
                if int(row["key"]) == 0 and int(row.get("cpid", me)) == me:
                    found.add(f"sysv {kind} id {row[header[1]]}")
    for name in os.listdir("/dev/shm"):
        tag = _PID_TAG.search(name)
        if (int(tag.group(1)) == me if tag is not None
                else _POSIX_IPC_RANDOM.fullmatch(name) is not None):
            found.add(f"/dev/shm/{name}")
    return found


# -- section 1: uncontended acquire + release --------------------------------------------


def pair_timer(acquire: Callable[[], Any], release: Callable[[], Any]) -> Timer:
    def timer(n: int) -> float:
        a, r, it = acquire, release, itertools.repeat(None, n)
        with gc_off():
            start = perf_counter()
            for _ in it:
                a()
                r()
            return perf_counter() - start

    return timer


def with_timer(lock: Any) -> Timer:
    def timer(n: int) -> float:
        lk, it = lock, itertools.repeat(None, n)
        with gc_off():
            start = perf_counter()
            for _ in it:
                with lk:
                    pass
            return perf_counter() - start

    return timer


def flock_timer(fd: int) -> Timer:
    def timer(n: int) -> float:
        flock, ex, un, it = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN, itertools.repeat(None, n)
        with gc_off():
            start = perf_counter()
            for _ in it:
                flock(fd, ex)
                flock(fd, un)
            return perf_counter() - start

    return timer


def empty_timer(n: int) -> float:
    it = itertools.repeat(None, n)
    with gc_off():
        start = perf_counter()
        for _ in it:
            pass
        return perf_counter() - start


def _ipcfork_mutex(backend: str, stack: ExitStack) -> ipcfork.Mutex:
    lock = ipcfork.Mutex(backend=backend)
    stack.callback(lock.close)
    return lock


def _raw_posix_sem(stack: ExitStack) -> Any:
    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, mode=0o600, initial_value=1)
    sem.unlink()  # the name goes at once; the mapping lives while we (or children) hold it
    stack.callback(sem.close)
    return sem


def _raw_sysv_sem(stack: ExitStack) -> Any:
    sem = sysv_ipc.Semaphore(sysv_ipc.IPC_PRIVATE, sysv_ipc.IPC_CREX, mode=0o600,
                             initial_value=1)
    stack.callback(sem.remove)
    sem.undo = True
    return sem


MP_LOCK = "multiprocessing.Lock"
MP_LOCK_WITH = "multiprocessing.Lock, `with l: pass`"
POSIX_MUTEX = "ipcfork Mutex (posix, default)"
POSIX_MUTEX_WITH = "ipcfork Mutex (posix), `with m: pass`"
SYSV_MUTEX = "ipcfork Mutex (sysv)"
RAW_SYSV = "raw sysv_ipc.Semaphore (undo=True)"
# (mine, peer, limit): section 1's targets, ratios of ns per pair (lower is better)
UNCONTENDED_TARGETS = (
    (POSIX_MUTEX, MP_LOCK, 1.2),
    (POSIX_MUTEX_WITH, MP_LOCK_WITH, 1.0),
    (SYSV_MUTEX, RAW_SYSV, 1.3),
)


def uncontended_variants(stack: ExitStack) -> list[tuple[str, Timer]]:
    """(label, timer) for every section-1 variant; the objects live until ``stack`` closes."""
    variants: list[tuple[str, Timer]] = []
    posix_lock = _ipcfork_mutex("posix", stack)
    mp_lock = MP.Lock()
    variants.append((POSIX_MUTEX, pair_timer(posix_lock.acquire, posix_lock.release)))
    variants.append((MP_LOCK, pair_timer(mp_lock.acquire, mp_lock.release)))
    variants.append((POSIX_MUTEX_WITH, with_timer(posix_lock)))
    variants.append((MP_LOCK_WITH, with_timer(mp_lock)))
    sysv_lock = _ipcfork_mutex("sysv", stack)
    variants.append((SYSV_MUTEX, pair_timer(sysv_lock.acquire, sysv_lock.release)))
    sysv_sem = _raw_sysv_sem(stack)
    variants.append((RAW_SYSV, pair_timer(sysv_sem.acquire, sysv_sem.release)))
    variants.append(("ipcfork Mutex (sysv), `with m: pass`", with_timer(sysv_lock)))
    posix_sem = _raw_posix_sem(stack)
    variants.append(("raw posix_ipc.Semaphore", pair_timer(posix_sem.acquire, posix_sem.release)))
    tmp = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the stack
    stack.callback(tmp.close)
    variants.append(("fcntl.flock LOCK_EX/LOCK_UN", flock_timer(tmp.fileno())))
    for backend in ("posix", "sysv"):
        sem = ipcfork.Semaphore(1, backend=backend)
        stack.callback(sem.close)
        variants.append((f"ipcfork Semaphore ({backend})", pair_timer(sem.acquire, sem.release)))
    return variants


def calibrate(timer: Timer, seconds: float) -> int:
    """A loop length taking about ``seconds`` (also serves as the warm-up)."""
    n = 1000
    while True:
        elapsed = timer(n)
        if elapsed >= seconds / 4:
            return max(1000, int(n * seconds / elapsed))
        n *= 4


def section_uncontended(cfg: Config) -> None:
    print("\n## 1. Uncontended acquire + release (one process, ns per pair, lower is better)\n")
    watch = CpuWatch()
    with ExitStack() as stack:
        variants = uncontended_variants(stack)
        loops = {label: calibrate(timer, cfg.pair_seconds) for label, timer in variants}
        for label, timer in variants:  # warm-up at full length
            timer(loops[label])
        empty_n = calibrate(empty_timer, cfg.pair_seconds)
        samples: dict[str, list[float]] = {label: [] for label, _ in variants}
        empty: list[float] = []
        for rep in range(cfg.reps):
            for label, timer in rotated(variants, rep):
                n = max(1, loops[label] // SUB_RUNS)
                samples[label].append(min(timer(n) for _ in range(SUB_RUNS)) / n * 1e9)
            empty.append(empty_timer(empty_n) / empty_n * 1e9)
        background = watch.background()

    ref = MP_LOCK
    med = {label: statistics.median(values) for label, values in samples.items()}
    rows = [
        (label, f"{med[label]:,.0f} ns",
         "1.00x (ref)" if label == ref else f"{med[label] / med[ref]:.2f}x")
        for label, _ in variants
    ]
    print(markdown_table(("variant", "median ns/pair", f"ratio to {ref}"), rows))
    print(f"\n{cfg.reps} repetitions, each keeping the best of {SUB_RUNS} slices of "
          f"{cfg.pair_seconds / SUB_RUNS * 1e3:.0f} ms; every figure includes the loop's own "
          f"cost of {statistics.median(empty):.0f} ns per iteration; other processes kept "
          f"{background:.2f} CPUs busy meanwhile.\n")
    for mine, peer, limit in UNCONTENDED_TARGETS:
        ratio = med[mine] / med[peer]
        paired = [a / b for a, b in zip(samples[mine], samples[peer], strict=True)]
        print(f"- target: {mine} / {peer} = {ratio:.2f}x (per-repetition "
              f"{min(paired):.2f}x..{max(paired):.2f}x), target <= {limit}x: "
              f"{verdict(ratio <= limit)}")


# -- section 2: two contending processes ---------------------------------------------------


@dataclass(frozen=True)
class Contended:
    label: str
    setup: Setup
    guarded: bool = True


@dataclass
class Results:
    rates: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    overlaps: list[float] = field(default_factory=list)
    backgrounds: list[float] = field(default_factory=list)
    retried: int = 0  # attempts thrown away because other processes disturbed them


@dataclass(frozen=True)
class Run:
    rate: float  # increments per second
    count: int  # the counter at the end
    overlap: float  # share of the wall time during which both children were working
    background: float  # CPUs kept busy by other processes meanwhile


def _shm_counter(stack: ExitStack) -> memoryview[int]:
    shm = ipcfork.SharedMemory(8)
    stack.callback(shm.close)
    counter = shm.buf.cast("Q")
    stack.callback(counter.release)  # runs first: views go before close()
    return counter


def _counter_body(lock: Any, counter: memoryview[int]) -> Body:
    def body(k: int) -> None:
        lk, c = lock, counter
        for _ in itertools.repeat(None, k):
            with lk:
                c[0] += 1

    return body


def _ipcfork_setup(backend: str) -> Setup:
    def setup(stack: ExitStack) -> tuple[Body, Callable[[], int]]:
        lock = _ipcfork_mutex(backend, stack)
        counter = _shm_counter(stack)
        return _counter_body(lock, counter), lambda: int(counter[0])

    return setup


def _raw_setup(make: Callable[[ExitStack], Any]) -> Setup:
    def setup(stack: ExitStack) -> tuple[Body, Callable[[], int]]:
        sem = make(stack)
        counter = _shm_counter(stack)
        return _counter_body(sem, counter), lambda: int(counter[0])

    return setup


def _mp_value_setup(stack: ExitStack) -> tuple[Body, Callable[[], int]]:
    value = MP.Value("q", 0)  # guarded by its own RLock

    def body(k: int) -> None:
        v = value
        for _ in itertools.repeat(None, k):
            with v.get_lock():
                v.value += 1

    return body, lambda: int(value.value)


def _mp_raw_value_setup(stack: ExitStack) -> tuple[Body, Callable[[], int]]:
    value = MP.RawValue("q", 0)
    lock = MP.Lock()

    def body(k: int) -> None:
        v, lk = value, lock
        for _ in itertools.repeat(None, k):
            with lk:
                v.value += 1

    return body, lambda: int(value.value)


def _unguarded_setup(stack: ExitStack) -> tuple[Body, Callable[[], int]]:
    counter = _shm_counter(stack)

    def body(k: int) -> None:
        c = counter
        for _ in itertools.repeat(None, k):
            c[0] += 1

    return body, lambda: int(counter[0])


REFERENCE = "multiprocessing.Value('q') + get_lock()"
DEFAULT_MUTEX = "ipcfork Mutex (posix, default)"
CONTENDED_TARGET = 3.0  # the default Mutex's rate / the reference's, at least
CONTENDED: list[Contended] = [
    Contended(DEFAULT_MUTEX, _ipcfork_setup("posix")),
    Contended("ipcfork Mutex (sysv)", _ipcfork_setup("sysv")),
    Contended(REFERENCE, _mp_value_setup),
    Contended("multiprocessing.RawValue + Lock", _mp_raw_value_setup),
    Contended("raw posix_ipc.Semaphore", _raw_setup(_raw_posix_sem)),
    Contended("raw sysv_ipc.Semaphore (undo=True)", _raw_setup(_raw_sysv_sem)),
    Contended("unguarded (no lock)", _unguarded_setup, guarded=False),
]


class RunFailed(Exception):
    """A contended run did not complete (a child failed or hung)."""


def _read_exactly(fd: int, n: int, timeout: float) -> None:
    got = 0
    deadline = time.monotonic() + timeout
    while got < n:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RunFailed(f"children not ready within {timeout} s")
        chunk = os.read(fd, n - got)
        if not chunk:
            raise RunFailed("children closed the ready pipe")
        got += len(chunk)


def _reap(pid: int, timeout: float) -> int:
    """Wait for child ``pid`` (os.waitpid), at most ``timeout`` s; its exit code."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        raise RunFailed(f"child {pid} still running after {timeout} s")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# Slots of the shared ``stamps`` array (float64): per child (+ slot number 0 or 1) its
# start and finish times and its arrival flag at the start barrier.
_START, _END, _ARRIVED = 0, 2, 4
_N_STAMPS = 6


def _child(slot: int, body: Body, k: int, stamps: memoryview[float], ready_w: int,
           go_r: int) -> None:
    """A forked child: report ready, wait for the start signal, meet the other child at the
    barrier, work, stamp, _exit."""
    status = 1
    try:
        gc.disable()
        os.write(ready_w, b"r")
        if os.read(go_r, 1) != b"g":
            raise RuntimeError("no start signal")
        stamps[_ARRIVED + slot] = 1.0
        other, yield_cpu = _ARRIVED + 1 - slot, os.sched_yield
        while stamps[other] == 0.0:
            yield_cpu()  # lets the other child run if both share a CPU
        stamps[_START + slot] = perf_counter()
        body(k)
        stamps[_END + slot] = perf_counter()
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def run_contended(variant: Contended, k: int, stamps: memoryview[float],
                  timeout: float) -> Run:
    """One run of ``variant``: two children, ``k`` increments each."""
    pids: list[int] = []
    with ExitStack() as stack:
        body, read_count = variant.setup(stack)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        for fd in (ready_r, ready_w, go_r, go_w):
            stack.callback(os.close, fd)
        for slot in range(_N_STAMPS):
            stamps[slot] = 0.0
        watch = CpuWatch()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            for slot in range(2):
                pid = os.fork()
                if pid == 0:
                    _child(slot, body, k, stamps, ready_w, go_r)
                pids.append(pid)
            _read_exactly(ready_r, 2, timeout)
            os.write(go_w, b"gg")
            codes = [_reap(pid, timeout) for pid in list(pids)]
            pids.clear()
            background = watch.background()
        finally:
            for pid in pids:  # only on failure: do not leave children behind
                with contextlib.suppress(ProcessLookupError, ChildProcessError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
        if any(codes):
            raise RunFailed(f"{variant.label}: child exit codes {codes}")
        starts, ends = stamps[_START:_START + 2].tolist(), stamps[_END:_END + 2].tolist()
        if min(starts + ends) <= 0.0:
            raise RunFailed(f"{variant.label}: a child did not stamp its start or finish")
        count = read_count()
    wall = max(ends) - min(starts)
    both = max(0.0, min(ends) - max(starts))
    return Run(2 * k / wall, count, both / wall, background)


def measure_contended(cfg: Config, variants: list[Contended], stamps: memoryview[float]
                      ) -> tuple[dict[str, Results], bool]:
    """Warm every variant up, then run them round-robin ``cfg.reps`` times; the results per
    label, and False if a guarded warm-up count was wrong (measured counts are kept in the
    results and checked by the caller)."""
    results = {v.label: Results() for v in variants}
    ok = True
    for variant in variants:  # warm-up, discarded (counts still checked)
        warm = max(1000, cfg.k // 10)
        count = run_contended(variant, warm, stamps, cfg.child_timeout).count
        if variant.guarded and count != 2 * warm:
            print(f"warm-up: {variant.label} final count {count:,} != {2 * warm:,}")
            ok = False
    for rep in range(cfg.reps):
        for variant in rotated(variants, rep):
            res = results[variant.label]
            kept: Run | None = None
            for _attempt in range(1 + cfg.retries):
                run = run_contended(variant, cfg.k, stamps, cfg.child_timeout)
                res.counts.append(run.count)  # every attempt's count is checked
                if kept is not None:
                    res.retried += 1
                if kept is None or run.background < kept.background:
                    kept = run
                if run.background <= QUIET:
                    break
            assert kept is not None
            res.rates.append(kept.rate)
            res.overlaps.append(kept.overlap)
            res.backgrounds.append(kept.background)
    return results, ok


def _details(r: Results) -> str:
    return (f"{min(r.rates) / 1e3:,.0f}k..{max(r.rates) / 1e3:,.0f}k/s; overlap "
            f"{statistics.median(r.overlaps):.0%}; background "
            f"{statistics.median(r.backgrounds):.2f} CPU")


def _counts_ok(variant: Contended, r: Results, expected: int) -> bool:
    """Print the final counts of ``variant``'s attempts; False if a guarded one was wrong."""
    counts = r.counts
    if variant.guarded:
        good = all(c == expected for c in counts)
        shown = ", ".join(f"{c:,}" for c in sorted(set(counts)))
        print(f"- {variant.label}: {shown} -> "
              f"{'OK' if good else 'WRONG'} in {sum(c == expected for c in counts)}"
              f"/{len(counts)} attempts; {_details(r)}")
        return good
    lost = [100.0 * (expected - c) / expected for c in counts]
    print(f"- {variant.label}: final counts {min(counts):,}..{max(counts):,}; lost updates "
          f"median {statistics.median(lost):.1f}% "
          f"(range {min(lost):.1f}%..{max(lost):.1f}%); {_details(r)}")
    return True


def _disturbed_warning(results: dict[str, Results]) -> None:
    disturbed = sum(b > QUIET for r in results.values() for b in r.backgrounds)
    kept = sum(len(r.backgrounds) for r in results.values())
    if disturbed:
        print(f"\nWARNING: in {disturbed} of the {kept} kept runs other processes still kept "
              f"more than {QUIET} of the {len(os.sched_getaffinity(0))} CPUs busy; two "
              "contenders then share fewer CPUs and the rates change regime.  Re-run on a "
              "quiet machine.")


def _target_line(results: dict[str, Results], mine: str, limit: float) -> str:
    ratio = statistics.median(results[mine].rates) / statistics.median(
        results[REFERENCE].rates)
    paired = [a / b for a, b in zip(results[mine].rates, results[REFERENCE].rates,
                                    strict=True)]
    return (f"- target: {mine} / {REFERENCE} = {ratio:.2f}x (per-repetition "
            f"{min(paired):.2f}x..{max(paired):.2f}x), target >= {limit}x: "
            f"{verdict(ratio >= limit)}")


def _open_stamps(stack: ExitStack) -> memoryview[float]:
    stamp_shm = ipcfork.SharedMemory(_N_STAMPS * 8)
    stack.callback(stamp_shm.close)
    stamps = stamp_shm.buf.cast("d")
    stack.callback(stamps.release)
    return stamps


def section_contended(cfg: Config) -> bool:
    """Run section 2; False if a guarded count was wrong."""
    k, expected = cfg.k, 2 * cfg.k
    print(f"\n## 2. Two processes contending, K = {k:,} increments each "
          "(increments/s, higher is better)\n")
    with ExitStack() as stack:
        results, ok = measure_contended(cfg, CONTENDED, _open_stamps(stack))

    med = {label: statistics.median(r.rates) for label, r in results.items()}
    rows = [
        (v.label, f"{med[v.label]:,.0f}/s",
         "1.00x (ref)" if v.label == REFERENCE else f"{med[v.label] / med[REFERENCE]:.2f}x")
        for v in CONTENDED
    ]
    print(markdown_table(("variant", "median increments/s", "ratio to reference"), rows))
    retried = sum(r.retried for r in results.values())
    print(f"\nreference: {REFERENCE}; {cfg.reps} repetitions; wall time from the start "
          "barrier to the later child's finish; a run during which other processes kept "
          f"more than {QUIET} CPUs busy got up to {cfg.retries} more attempt(s), keeping the "
          f"quietest ({retried} extra attempt(s) made).\n")
    print(f"Final counts (expected {expected:,} = 2 x K in every attempt), the range of "
          "rates, the median share of the wall time during which both children were working "
          "('overlap') and the median CPUs other processes kept busy ('background'):")
    for v in CONTENDED:
        ok = _counts_ok(v, results[v.label], expected) and ok
    _disturbed_warning(results)
    print("\n" + _target_line(results, DEFAULT_MUTEX, CONTENDED_TARGET))
    return ok


def _spin_setup(spins: int) -> Setup:
    """Section 2's default Mutex with the compiled core's spin count set to ``spins`` for
    the run (the children inherit it at fork); the library's default comes back after."""
    inner = _ipcfork_setup("posix")

    def setup(stack: ExitStack) -> tuple[Body, Callable[[], int]]:
        _native._impl.set_spin(spins)
        stack.callback(_native._impl.set_spin, _native.SPINS)
        return inner(stack)

    return setup


def section_spins(cfg: Config) -> bool:
    """Run section 3 (compiled path only); False if a count was wrong."""
    k, expected = cfg.k, 2 * cfg.k
    print(f"\n## 3. Spin count of a contended compiled acquire, K = {k:,} increments each "
          "(increments/s, higher is better)\n")
    if _native.PATH != "compiled":
        print(f"skipped: the {_native.PATH} path never spins (set_spin has no effect there).")
        return True
    if not cfg.spins:
        print("skipped (--spins none).")
        return True
    labels = {n: f"ipcfork Mutex (posix), spin {n}" + (" (default)" if n == _native.SPINS
                                                        else "") for n in cfg.spins}
    variants = [Contended(labels[n], _spin_setup(n)) for n in cfg.spins]
    variants.append(Contended(REFERENCE, _mp_value_setup))
    with ExitStack() as stack:
        results, ok = measure_contended(cfg, variants, _open_stamps(stack))
    ref = statistics.median(results[REFERENCE].rates)
    rows = []
    for v in variants:
        r = results[v.label]
        paired = [a / b for a, b in zip(r.rates, results[REFERENCE].rates, strict=True)]
        rows.append((v.label, f"{statistics.median(r.rates):,.0f}/s",
                     f"{min(r.rates) / 1e3:,.0f}k..{max(r.rates) / 1e3:,.0f}k/s",
                     "1.00x (ref)" if v.label == REFERENCE
                     else f"{statistics.median(r.rates) / ref:.2f}x",
                     "" if v.label == REFERENCE
                     else f"{min(paired):.2f}x..{max(paired):.2f}x",
                     f"{statistics.median(r.overlaps):.0%}",
                     f"{statistics.median(r.backgrounds):.2f}"))
    print(markdown_table(("variant", "median increments/s", "range", "ratio to reference",
                          "per-repetition ratio", "overlap", "background CPU"), rows))
    retried = sum(r.retried for r in results.values())
    print(f"\nreference: {REFERENCE}; {cfg.reps} repetitions, the same method as section 2 "
          f"({retried} extra attempt(s) made); the library's default spin count is "
          f"{_native.SPINS}.")
    bad = [v.label for v in variants if any(c != expected for c in results[v.label].counts)]
    if bad:
        print(f"WRONG final counts: {', '.join(bad)}")
    _disturbed_warning(results)
    best = max(cfg.spins, key=lambda n: statistics.median(results[labels[n]].rates))
    print(f"\nbest median: spin {best} "
          f"({statistics.median(results[labels[best]].rates) / ref:.2f}x the reference)")
    return ok and not bad


# -- main -------------------------------------------------------------------------------


def _spin_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        spins = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(not 0 <= n <= 1_000_000 for n in spins):
        raise argparse.ArgumentTypeError("spin counts must be in 0..1000000")
    return spins


def _section_list(text: str) -> tuple[int, ...]:
    try:
        sections = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of section numbers: {text!r}") from None
    if not sections or any(n not in (1, 2, 3) for n in sections):
        raise argparse.ArgumentTypeError("sections are 1, 2 and 3")
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions and shorter runs (about 20 s)")
    parser.add_argument("--reps", type=int, help="override the number of repetitions")
    parser.add_argument("-k", type=int, help="override K, the increments per child")
    parser.add_argument("--retries", type=int,
                        help="extra attempts for a contended run disturbed by other processes")
    parser.add_argument("--only", type=_section_list,
                        help="run only these sections, comma-separated (e.g. 3 or 2,3)")
    parser.add_argument("--spins", type=_spin_list,
                        help="spin counts section 3 compares, comma-separated, or 'none' "
                             "(default 0,50,100,400,2000)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.reps is not None:
        cfg = replace(cfg, reps=max(1, args.reps))
    if args.k is not None:
        cfg = replace(cfg, k=max(1000, args.k))
    if args.retries is not None:
        cfg = replace(cfg, retries=max(0, args.retries))
    if args.spins is not None:
        cfg = replace(cfg, spins=args.spins)

    print(environment_line())
    print(f"mode: {'quick' if args.quick else 'full'}, {cfg.reps} repetitions, "
          "variants interleaved round-robin, medians reported")
    before = own_ipc_objects()
    began = time.monotonic()
    counts_ok = False
    try:
        only = args.only or (1, 2, 3)
        counts_ok = True
        if 1 in only:
            section_uncontended(cfg)
        if 2 in only:
            counts_ok = section_contended(cfg)
        if 3 in only:
            counts_ok = section_spins(cfg) and counts_ok
    except RunFailed as exc:
        print(f"\nFAILED: {exc}")
    gc.collect()
    leaked = sorted(own_ipc_objects() - before)
    left = testing.children()
    print(f"\ncleanup: new IPC objects: {', '.join(leaked) or 'none'}; child processes left: "
          f"{left or 'none'}; total time {time.monotonic() - began:.0f} s; "
          f"load average now {os.getloadavg()[0]:.2f}")
    return 0 if counts_ok and not leaked and not left else 1


if __name__ == "__main__":
    sys.exit(main())
