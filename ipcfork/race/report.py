"""Turning run results into what the command prints: tables, notes, a JSON document, and
the exit status."""

from __future__ import annotations

import itertools
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .crash import CRASH
from .crashreport import crash_lines, crash_notes
from .guards import GUARDS
from .runner import RunResult

__all__ = ["Usage", "exit_status", "format_report", "json_document", "notes", "usage"]

SUGGESTED_WINDOW = "50us"


@dataclass(frozen=True)
class Usage:
    """Wall time of the whole command and peak resident memory (``ru_maxrss``, KiB) of this
    process and of the largest child it reaped."""

    wall_time: float
    self_rss_kib: int
    children_rss_kib: int


def usage(wall_time: float) -> Usage:
    """This process's :class:`Usage` now, given the wall time measured by the caller."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return Usage(wall_time, me, children)


def exit_status(results: Sequence[RunResult]) -> int:
    """0 when every guarded run was exact, 1 when a guarded run lost (or duplicated) one or
    a robust guard wedged under ``crash``."""
    return 1 if any(r.failed for r in results) else 0


def _groups(results: Sequence[RunResult]) -> list[list[RunResult]]:
    """Consecutive results of the same scenario and worker count."""
    return [list(group) for _, group in
            itertools.groupby(results, key=lambda r: (r.scenario, r.workers))]


def _verdict(r: RunResult) -> str:
    if r.skipped:
        return f"skipped: {r.skipped}"
    if r.scenario == "deadlock":
        return f"deadlock ({r.deadlocked} gave up)" if r.deadlocked else "no deadlock"
    if not r.guarded:
        if not r.exact:
            return "lost updates (the race)"
        return "no loss seen: try --window" if r.workers > 1 else "no loss (nobody to race)"
    if r.failed:
        return "LOST UPDATES" + (" (broken on purpose)" if GUARDS[r.guard].broken else "")
    return "exact"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first and last columns, the numbers right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    last = len(header) - 1
    out = []
    for row in [header, *rows]:
        cells = [cell.ljust(w) if i in (0, last) else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return out


def _group_lines(group: list[RunResult]) -> list[str]:
    first = group[0]
    ran = [r for r in group if not r.skipped]
    fastest = max((r.ops_per_s for r in ran), default=0.0)
    if first.scenario == CRASH:
        return crash_lines(group, _table)
    if first.scenario == "deadlock":
        title = f"deadlock: {first.workers} workers in a ring of {first.workers} locks"
        header = ["guard", "workers", "got both", "gave up", "time s", "verdict"]
        rows = [[r.guard, "-", "-", "-", "-", _verdict(r)] if r.skipped else
                [r.guard, str(r.workers), str(r.observed), str(r.deadlocked),
                 f"{r.elapsed:.2f}", _verdict(r)] for r in group]
    else:
        title = (f"{first.scenario}: {_workers(first.workers)} x {first.iterations:,} "
                 f"iterations, window {_seconds(first.window)}")
        if first.scenario == "transfer":  # the only one drawing random numbers
            title += f", seed {first.seed}"
        header = ["guard", "expected", "observed", "lost", "lost %"]
        header += ["duplicated"] if first.scenario == "buffer" else []
        header += ["ops/s", "vs fastest", "verdict"]
        rows = []
        for r in group:
            if r.skipped:
                rows.append([r.guard] + ["-"] * (len(header) - 2) + [_verdict(r)])
                continue
            row = [r.guard, f"{r.expected:,}", f"{r.observed:,}", f"{r.lost:,}",
                   f"{r.lost_pct:.2f}%"]
            row += [f"{r.duplicated:,}"] if first.scenario == "buffer" else []
            ratio = r.ops_per_s / fastest if fastest else 0.0
            row += [f"{r.ops_per_s:,.0f}", f"{ratio:.2f}", _verdict(r)]
            rows.append(row)
    return [title, *_table(header, rows)]


def _seconds(value: float) -> str:
    if value == 0:
        return "0 (none)"
    if value < 1e-3:
        return f"{value * 1e6:g} us"
    if value < 1:
        return f"{value * 1e3:g} ms"
    return f"{value:g} s"


def _workers(count: int) -> str:
    return f"{count} worker" + ("s" if count != 1 else "")


def notes(results: Sequence[RunResult]) -> list[str]:
    """Plain-language conclusions: what the unguarded runs showed, which guards failed."""
    out = []
    raced = [r for r in results if not r.skipped and not r.guarded and r.scenario != "deadlock"]
    quiet = [r for r in raced if r.exact and r.workers > 1]  # one worker has no one to race
    for r in raced:
        if not r.exact:
            extra = f", {r.duplicated:,} duplicated" if r.duplicated else ""
            what = "items" if r.scenario == "buffer" else "updates"
            out.append(f"unguarded {r.scenario} with {_workers(r.workers)}: {r.lost:,} of "
                       f"{r.updates:,} {what} lost ({r.lost_pct:.1f}%){extra}.")
    if quiet:
        where = ", ".join(f"{r.scenario} with {_workers(r.workers)}" for r in quiet)
        out.append(f"The unguarded run lost nothing ({where}): the race did not show this "
                   f"time. Widen the gap between read and write, e.g. --window "
                   f"{SUGGESTED_WINDOW}, or raise --iterations.")
    failed = [r for r in results if r.failed and r.scenario != CRASH]  # crash: its notes
    judged = [r for r in results if not r.skipped and r.guarded
              and r.scenario not in ("deadlock", CRASH)]
    if failed:
        which = ", ".join(f"{r.guard} ({r.scenario}, {_workers(r.workers)})" for r in failed)
        out.append(f"FAILED: guarded runs lost updates: {which}.")
    elif judged:
        out.append("Every guarded run was exact.")
    return out + crash_notes(results)


def format_report(results: Sequence[RunResult], use: Usage) -> str:
    """The tables, the notes, the wall time and peak memory, as text."""
    lines: list[str] = []
    for group in _groups(results):
        lines += [*_group_lines(group), ""]
    lines += notes(results)
    lines.append(f"wall time {use.wall_time:.1f} s; peak memory (ru_maxrss): this process "
                 f"{use.self_rss_kib / 1024:.1f} MiB, largest worker "
                 f"{use.children_rss_kib / 1024:.1f} MiB")
    return "\n".join(lines)


def json_document(results: Sequence[RunResult], config: dict[str, Any],
                  use: Usage) -> dict[str, Any]:
    """Everything the text report says, machine-readable."""
    return {
        "config": config,
        "runs": [r.to_dict() for r in results],
        "notes": notes(results),
        "wall_time_s": round(use.wall_time, 4),
        "peak_rss_kib": {"self": use.self_rss_kib, "children": use.children_rss_kib},
        "exit_status": exit_status(results),
    }
