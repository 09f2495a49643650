"""The ``crash`` scenario's part of the report: its table and its notes (``report`` lays
them out with the other scenarios')."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .crash import CrashResult
from .guards import GUARDS
from .runner import RunResult

__all__ = ["crash_lines", "crash_notes", "crash_verdict"]

NOT_TOLD = "—"  # the guard cannot tell (no owner, or no critical section): not a zero


def crash_verdict(r: CrashResult) -> str:
    """The verdict, with the counter check when it failed."""
    verdict = r.verdict
    if r.skipped or r.exact:
        return verdict
    if r.lost:
        verdict = f"{verdict}; LOST {r.lost:,} UPDATES"
    else:
        verdict = f"{verdict}; COUNTER {r.in_flight:,} AHEAD (more than one per kill)"
    return verdict + (" (broken on purpose)" if GUARDS[r.guard].broken else "")


def _interval(pair: tuple[float, float]) -> str:
    low, high = (f"{value * 1e3:g}" for value in pair)
    return f"every {low} ms" if low == high else f"every {low}-{high} ms"


def _told(value: int | None) -> str:
    return NOT_TOLD if value is None else f"{value:,}"


def crash_lines(group: Sequence[RunResult],
                table: Callable[[Sequence[str], Sequence[Sequence[str]]], list[str]],
                ) -> list[str]:
    """The title and table of one group of crash results (same worker count)."""
    first = group[0]
    assert isinstance(first, CrashResult)
    title = (f"crash: {first.workers} worker{'s' if first.workers != 1 else ''}, a SIGKILL "
             f"{_interval(first.kill_every)} for {first.duration:g} s per guard, wedged "
             f"after {first.stall_threshold:g} s without progress, seed {first.seed}")
    header = ["guard", "kills", "seen in CS", "owner died", "longest stall", "increments",
              "in flight", "verdict"]
    rows = []
    for r in group:
        assert isinstance(r, CrashResult)
        if r.skipped:
            rows.append([r.guard] + ["-"] * (len(header) - 2) + [crash_verdict(r)])
            continue
        rows.append([r.guard, f"{r.kills:,}", _told(r.kills_in_cs), _told(r.owner_died),
                     f"{r.longest_stall:.3f} s", f"{r.observed:,}", f"{r.in_flight:,}",
                     crash_verdict(r)])
    return [title, *table(header, rows)]


def crash_notes(results: Sequence[RunResult]) -> list[str]:
    """What the crash runs showed, in plain language; a FAILED line for a robust guard
    that wedged or a count that is off."""
    ran = [r for r in results if isinstance(r, CrashResult) and not r.skipped]
    if not ran:
        return []
    out = []
    expected = sorted({r.guard for r in ran if r.wedged and not r.robust})
    if expected:
        out.append(f"Wedged, as they must (no owner, so nobody gives them back): "
                   f"{', '.join(expected)}.")
    spared = sorted({r.guard for r in ran if not r.wedged and not r.robust
                     and r.kills_in_cs and not GUARDS[r.guard].broken})
    if spared:
        out.append(f"Never wedged, though nobody was told of a holder's death: "
                   f"{', '.join(spared)} (the kernel released the lock with the process).")
    wedged = [r for r in ran if r.wedged and r.robust]
    if wedged:
        which = ", ".join(f"{r.guard} ({r.workers} workers, after {r.wedged_after:,} "
                          f"kill{'s' if r.wedged_after != 1 else ''})" for r in wedged)
        out.append(f"FAILED: robust guards wedged: {which}.")
    off = [r for r in ran if not r.exact]
    if off:
        which = ", ".join(f"{r.guard} ({r.workers} workers)" for r in off)
        out.append(f"FAILED: the counter does not match the increments recorded: {which}.")
    robust = [r for r in ran if r.robust]
    if robust and not any(r.failed for r in robust):
        out.append("Every robust guard survived every kill, with the counter in step.")
    return out
