"""Section 3 of bench_pool.py: child exit to future resolved, ForkPool against bare fork."""

from __future__ import annotations

import mmap
import os
import queue
import select
import statistics
import time
from collections.abc import Callable
from typing import Any

from _common import CpuWatch, gc_off, markdown_table
from _pool_kit import PAGE, RunFailed, Variant, ratio_line, run_reps

import ipcfork

monotonic_ns = time.monotonic_ns


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


def section_latency(reps: int, samples: int) -> None:
    n = samples
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
    medians = run_reps(variants, reps, warmup=False)
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
    dropped = reps * n - len(all_samples[forkpool])
    print(f"\nmedian of the {reps} per-repetition medians; p10/p90/max over all samples; "
          f"CLOCK_MONOTONIC (time.monotonic_ns) on both sides; {dropped} ForkPool sample(s) "
          "dropped (future resolved before its callback was added); other processes kept "
          f"{watch.background():.2f} CPUs busy meanwhile.\n")
    print(ratio_line("ForkPool / blocking waitpid (median latency)", medians[forkpool],
                     medians[WAITPID], 1.3, higher_is_better=False))
