"""``--plot FILE.png``: lost updates and throughput against the number of workers, one line
per guard and one row of two charts per scenario; for ``crash``, bars per guard: the
longest stall (against the stall threshold) and the kills it took to wedge it.

matplotlib is optional (``pip install 'ipcfork[plot]'``) and imported only here, only when
a plot is asked for.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

from .crash import CRASH, CrashResult
from .runner import RunResult

__all__ = ["require_matplotlib", "write_plot"]


def require_matplotlib() -> Any:
    """The ``matplotlib.pyplot`` module, drawing off-screen.

    Raises ImportError with the command that installs it when matplotlib is missing.
    """
    # Imported by name: type checking must not need matplotlib, which is optional.
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'ipcfork[plot]' "
                          "(or pip install matplotlib)") from exc
    matplotlib.use("Agg")  # files only: never open a window or need a display
    return importlib.import_module("matplotlib.pyplot")


def write_plot(results: Sequence[RunResult], path: str | os.PathLike[str]) -> None:
    """Draw ``results`` into the image file ``path`` (format from its suffix).

    Raises ImportError when matplotlib is missing, OSError when the file cannot be written.
    """
    plt = require_matplotlib()
    ran = [r for r in results if not r.skipped]
    scenarios = list(dict.fromkeys(r.scenario for r in ran)) or ["(nothing ran)"]
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(11, 3.6 * len(scenarios)),
                             squeeze=False)
    for row, scenario in zip(axes, scenarios, strict=True):
        lost_ax, speed_ax = row
        mine = [r for r in ran if r.scenario == scenario]
        if scenario == CRASH:
            _crash_row(row, [r for r in mine if isinstance(r, CrashResult)])
            continue
        deadlock = scenario == "deadlock"
        for guard in dict.fromkeys(r.guard for r in mine):
            points = sorted((r.workers, r) for r in mine if r.guard == guard)
            xs = [w for w, _ in points]
            lost = [r.deadlocked if deadlock else r.lost_pct for _, r in points]
            lost_ax.plot(xs, lost, marker="o", label=guard)
            speed_ax.plot(xs, [r.ops_per_s for _, r in points], marker="o", label=guard)
        lost_ax.set_title(f"{scenario}: " + ("workers that gave up" if deadlock
                                              else "lost updates"))
        lost_ax.set_ylabel("workers" if deadlock else "% of updates")
        speed_ax.set_title(f"{scenario}: throughput")
        speed_ax.set_ylabel("operations/s")
        if any(r.ops_per_s > 0 for r in mine):
            speed_ax.set_yscale("log")  # guards differ by orders of magnitude
        counts = sorted({r.workers for r in mine})
        for ax in row:
            ax.set_xlabel("workers")
            if counts:
                ax.set_xticks(counts)
            ax.grid(True, alpha=0.3)
        if mine:  # one legend per row: both charts draw the same guards in the same colours
            lost_ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(os.fspath(path), dpi=100)
    finally:
        plt.close(fig)


def _crash_row(row: Any, results: list[CrashResult]) -> None:
    """Bars per guard, one colour per worker count: the longest stall (log scale, the
    threshold dashed) and the kills made until it wedged, or in all (hatched: wedged)."""
    stall_ax, kills_ax = row
    guards = list(dict.fromkeys(r.guard for r in results))
    counts = sorted({r.workers for r in results})
    width = 0.8 / max(1, len(counts))
    for i, count in enumerate(counts):
        mine = {r.guard: r for r in results if r.workers == count}
        xs = [g + (i - (len(counts) - 1) / 2) * width for g in range(len(guards))]
        picked = [mine.get(guard) for guard in guards]
        hatch = ["//" if r is not None and r.wedged else "" for r in picked]
        label = f"{count} worker" + ("s" if count != 1 else "")
        for ax, values in ((stall_ax, [r.longest_stall if r else 0.0 for r in picked]),
                           (kills_ax, [(r.wedged_after if r.wedged else r.kills) if r else 0
                                       for r in picked])):
            bars = ax.bar(xs, values, width, label=label)
            for bar, pattern in zip(bars, hatch, strict=True):
                bar.set_hatch(pattern)
    thresholds = sorted({r.stall_threshold for r in results})
    for threshold in thresholds:
        stall_ax.axhline(threshold, linestyle="--", color="grey", linewidth=1)
    stall_ax.set_title(f"{CRASH}: longest stall (dashed: wedged threshold)")
    stall_ax.set_ylabel("seconds")
    if results:
        stall_ax.set_yscale("log")  # milliseconds for robust guards, the threshold for others
    kills_ax.set_title(f"{CRASH}: kills until wedged (hatched) or in all")
    kills_ax.set_ylabel("SIGKILLs")
    for ax in row:
        ax.set_xticks(range(len(guards)))
        ax.set_xticklabels(guards, rotation=30, ha="right", fontsize="small")
        ax.grid(True, axis="y", alpha=0.3)
    if len(counts) > 1:
        stall_ax.legend(fontsize="small")
