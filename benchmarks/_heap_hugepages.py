"""Section 4 of bench_pool.py, second table: fork per task from a parent holding a 1 GiB
bytearray and 2,000,000 small strings, with and without transparent huge pages.

Huge pages cannot be taken back once collapsed, so every repetition runs in a fresh
interpreter (a "lab": this file run as a script) that builds the data and then measures, in
this order: ``ForkPool(2)``; ``ForkPool(2, zygote=True)`` made after the data loaded (its
helper is a fork of the big parent); and ForkPool(2) after huge pages
(``ForkPool(2, hugepages=True)`` when this ipcfork accepts it, else ``collapse_hugepages()``
called before the pool).  A lab with no data gives the small-heap reference.  Repetitions
alternate the small and the big lab; the rows are medians over the repetitions and the
target ratio is paired per repetition.

Each measurement: an open pool, 4 warm-up tasks (with ``hugepages=True`` the collapse runs
before the first of them), 10 tasks to size the run, then about ``seconds`` worth of trivial
tasks through ``map`` (the figure), then 3 tasks whose child walks all 2,000,000 strings
(taking a reference to each, so every page of them is copied on write) and times itself.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import CpuWatch, markdown_table, rotated, verdict

import ipcfork

__all__ = ["LabFailed", "section_big_parent"]

GIB, MIB, PAGE = 1 << 30, 1 << 20, os.sysconf("SC_PAGE_SIZE")
STRINGS = 2_000_000
TARGET = 2.5  # the small-heap rate may be at most this many times the huge-page rate
HEAP: list[bytearray] = []
OBJECTS: list[str] = []
perf_counter = time.perf_counter


class LabFailed(Exception):
    """A lab process failed or returned wrong results."""


# -- inside a lab -----------------------------------------------------------------------------


def small_task(i: int) -> int:
    return 2 * i + 1


def walk() -> float:
    """Seconds this child takes to visit every small string (a reference taken to each)."""
    start = perf_counter()
    total = 0
    for text in OBJECTS:
        total += len(text)
    return perf_counter() - start


def _proc_kib(path: str, key: str) -> int:
    with open(path) as source:
        for line in source:
            if line.startswith(key):
                return int(line.split()[1])
    raise LabFailed(f"no {key} in {path}")


def bare_forks(n: int) -> float:
    """Forks per second of a sequential fork / _exit / waitpid loop."""
    start = perf_counter()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    return n / (perf_counter() - start)


def measure(make_pool: Callable[[], ipcfork.ForkPool], seconds: float) -> dict[str, Any]:
    """The figures of one pool (see the module docstring)."""
    started = perf_counter()
    with make_pool() as pool:
        if list(pool.map(small_task, range(4))) != [small_task(i) for i in range(4)]:
            raise LabFailed("wrong warm-up results")
        first = perf_counter() - started
        start = perf_counter()
        list(pool.map(small_task, range(10)))
        n = max(20, int(10 / (perf_counter() - start) * seconds))
        start = perf_counter()
        results = list(pool.map(small_task, range(n)))
        rate = n / (perf_counter() - start)
        if results != [small_task(i) for i in range(n)]:
            raise LabFailed("wrong results")
        walks = [pool.submit(walk).result(timeout=600) for _ in range(3)] if OBJECTS else []
        report = getattr(pool, "hugepages_report", None)
    return {"rate": rate, "tasks": n, "walk": statistics.median(walks) if walks else None,
            "first": first, "report": report.summary() if report is not None else None,
            "report_seconds": getattr(report, "seconds", None)}


def lab(big: bool, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if big:
        heap = bytearray(GIB)
        heap[::PAGE] = b"\x01" * (GIB // PAGE)  # every page written: the parent owns it
        HEAP.append(heap)
        OBJECTS.extend(str(i) for i in range(STRINGS))
    out["rss_mib"] = _proc_kib("/proc/self/status", "VmRSS:") / 1024
    out["bare"] = bare_forks(20)
    out["plain"] = measure(lambda: ipcfork.ForkPool(2), seconds)
    if not big:
        return out
    out["zygote"] = measure(lambda: ipcfork.ForkPool(2, zygote=True), seconds)
    if "hugepages" in inspect.signature(ipcfork.ForkPool).parameters:  # the pool option
        out["how"] = "ForkPool(2, hugepages=True)"
        out["huge"] = measure(lambda: ipcfork.ForkPool(2, hugepages=True), seconds)
        if out["huge"]["report"] is None:  # accepted, but it did not say it collapsed
            out["option_ignored"] = out.pop("huge")
    if "huge" not in out:
        from ipcfork._os.hugepages import collapse_hugepages as internal

        collapse: Callable[[], Any] = getattr(ipcfork, "collapse_hugepages", internal)
        start = perf_counter()
        report = collapse()
        out["how"] = "collapse_hugepages(), then ForkPool(2)"
        out["collapse"] = {"seconds": perf_counter() - start, "summary": report.summary()}
        out["huge"] = measure(lambda: ipcfork.ForkPool(2), seconds)
    out["huge_after_run_mib"] = _proc_kib("/proc/self/smaps_rollup", "AnonHugePages:") / 1024
    out["bare_huge"] = bare_forks(100)
    return out


# -- in bench_pool.py -------------------------------------------------------------------------


def run_lab(big: bool, seconds: float) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--seconds", str(seconds)]
    if big:
        command.append("--big")
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("LAB ")]
    if done.returncode != 0 or not lines:
        raise LabFailed(f"lab ({'big' if big else 'small'} parent) exited with "
                        f"{done.returncode}: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1][4:])
    result["stderr"] = done.stderr.strip()
    return result


def section_big_parent(reps: int, seconds: float) -> None:
    """Print the table (the heading is bench_pool's)."""
    watch = CpuWatch()
    labs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for rep in range(reps):
        for big in rotated([False, True], rep):
            sys.stdout.flush()
            labs[big].append(run_lab(big, seconds))
    small, big = labs[False], labs[True]
    ref = statistics.median(lab["plain"]["rate"] for lab in small)
    how = big[-1]["how"]
    rows = []

    def row(label: str, labs_: list[dict[str, Any]], key: str, bare: str) -> None:
        rates = [lab[key]["rate"] for lab in labs_]
        walks = [lab[key]["walk"] for lab in labs_ if lab[key]["walk"] is not None]
        rate = statistics.median(rates)
        rows.append((label, f"{statistics.median(lab[key]['tasks'] for lab in labs_):,.0f}",
                     f"{rate:,.0f}/s", f"{min(rates):,.0f}..{max(rates):,.0f}",
                     f"{ref / rate:.2f}x",
                     f"{statistics.median(lab[bare] for lab in labs_):,.0f}/s" if bare else "",
                     f"{statistics.median(walks) * 1e3:,.0f} ms" if walks else ""))

    row(f"small parent (VmRSS {small[0]['rss_mib']:,.0f} MiB): ForkPool(2)", small, "plain",
        "bare")
    label = f"1 GiB + 2M strings (VmRSS {big[0]['rss_mib']:,.0f} MiB):"
    row(f"{label} ForkPool(2)", big, "plain", "bare")
    row(f"{label} ForkPool(2, zygote=True) made after the data", big, "zygote", "")
    row(f"{label} {how}", big, "huge", "bare_huge")
    print(markdown_table(("parent and pool", "tasks per run", "median tasks/s", "range",
                          "small parent / this", "bare fork loop", "child walks 2M strings"),
                         rows))
    paired = [s["plain"]["rate"] / b["huge"]["rate"] for s, b in zip(small, big, strict=True)]
    ratio = ref / statistics.median(lab["huge"]["rate"] for lab in big)
    first = [lab["huge"]["first"] for lab in big]
    collapse = [lab["collapse"]["seconds"] for lab in big if "collapse" in lab]
    collapse += [lab["huge"]["report_seconds"] for lab in big
                 if lab["huge"].get("report_seconds") is not None]
    summary = big[-1].get("collapse", {}).get("summary") or big[-1]["huge"]["report"]
    print(f"\n{reps} repetitions, each in fresh interpreters (collapsed memory cannot be "
          "undone); within a big-parent lab the pools run in the row order, each opened, "
          "warmed up (4 tasks) and timed over about "
          f"{seconds:g} s of trivial tasks; 'child walks' is the median time a child takes to "
          "visit every string (copying their pages on write); the bare loop forks from the "
          "lab's parent itself.  Huge pages: "
          + (f"collapse took {statistics.median(collapse):.2f} s (median), " if collapse
             else "")
          + f"the first 4 tasks of that pool {statistics.median(first):.2f} s; "
          f"AnonHugePages after its run {big[-1]['huge_after_run_mib']:,.0f} MiB; "
          f"last report: {summary}.  Other processes kept {watch.background():.2f} CPUs "
          "busy meanwhile.\n")
    print(f"- target: small parent / 1 GiB + 2M strings with huge pages = {ratio:.2f}x "
          f"(per-repetition {min(paired):.2f}x..{max(paired):.2f}x), target <= {TARGET}x: "
          f"{verdict(ratio <= TARGET)}")
    if any("option_ignored" in lab for lab in big):
        print("- ForkPool(2, hugepages=True) was accepted but left no hugepages_report (and "
              "no huge pages): the row uses collapse_hugepages() instead.")
    warned = {line for lab in big for line in lab["stderr"].splitlines() if "Warning" in line}
    for line in sorted(warned):
        print(f"- lab warning: {line[:200]}")


def main() -> None:
    parser = argparse.ArgumentParser(description="one lab run (used by bench_pool.py)")
    parser.add_argument("--big", action="store_true", help="load 1 GiB + 2M strings first")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    print("LAB " + json.dumps(lab(args.big, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
