"""The race laboratory as a benchmark: every scenario under every default guard, over 1, 2,
4 and 8 workers, with the lost updates and the throughput of each guard.

Run from the repository root::

    python benchmarks/bench_race.py            # full: 3 repetitions, ~2.5 min on 2 cores
    python benchmarks/bench_race.py --quick    # smoke run: 1 repetition, fewer iterations

Options: ``--reps N`` (repetitions), ``--out-dir DIR`` (default ``benchmarks/results/``).

What is measured
----------------
- ``counter``, ``transfer`` and ``buffer`` (:mod:`ipcfork.race`), window 0: ops/s of all
  workers together (``RunResult.ops_per_s``: from the first worker's start to the last
  one's end, so forking is not counted) and the updates lost (items, for ``buffer``).
  Iterations per worker are fixed, so 8 workers do 8 times the work of one.
- ``deadlock`` (a ring of locks taken in opposite order, lock timeout 0.2 s): how many
  workers gave up and how long the run took to report it.  It needs two workers, so it
  runs at 2, 4 and 8.
- One default ``ipcfork race`` run as a subprocess (``python -m ipcfork race``), first,
  before this process has forked anything: wall time, CPU time and peak RSS (its own
  report line, and ``ru_maxrss`` of ``RUSAGE_CHILDREN`` as seen from here).

Method: each repetition runs every scenario x workers cell with the guards in rotated order
(``_common.rotated``), so machine noise hits all guards alike; the tables give medians over
the repetitions, and a spread line per table the max/min ratio of the repetitions.  The
ratio columns compare each guard's median with the fastest exact guard's (``none`` is not
exact) at 2 and 4 workers.  Output: markdown on stdout and in ``OUT_DIR/race.md``, and a
plot ``OUT_DIR/race.png`` of the medians (throughput per guard for each scenario; the
unguarded lost updates; the deadlocked workers), skipped with a note when matplotlib is
missing.  ``CpuWatch`` gives the other processes' CPU load during 2 s of sleep before the
sweep and during the sweep.

Cleanup: the machine's IPC objects are compared before and after, and no child may be
left.  Exit status: 0 when every guarded run was exact and nothing leaked, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import CpuWatch, markdown_table, rotated

import ipcfork
from ipcfork import race, testing
from ipcfork.race.plot import require_matplotlib

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = (1, 2, 4, 8)
RATIO_AT = (2, 4)
LOCK_TIMEOUT = 0.2  # every deadlock run costs this much
SEED = 20240501  # transfers drawn the same for every guard of a repetition (+ rep)
IDLE_CHECK = 2.0  # seconds of sleep before the sweep: the background with nothing of ours
LEAK_RECHECK = 2.0  # seconds before a second look (another process's objects come and go)


@dataclass(frozen=True)
class Config:
    reps: int
    iterations: dict[str, int]  # per worker, per scenario


FULL = Config(3, {"counter": 50_000, "transfer": 20_000, "buffer": 20_000, "deadlock": 1})
QUICK = Config(1, {"counter": 5_000, "transfer": 2_000, "buffer": 2_000, "deadlock": 1})


def environment_line() -> str:
    return (f"environment: Python {platform.python_version()} | ipcfork "
            f"{getattr(ipcfork, '__version__', '?')} | {len(os.sched_getaffinity(0))} CPUs "
            f"usable (cpu_count {os.cpu_count()}) | kernel {platform.release()} "
            f"{platform.machine()} | load {os.getloadavg()[0]:.2f}")


# -- the default `ipcfork race` run --------------------------------------------------------


def default_command_run() -> tuple[list[str], int]:
    """Time one default ``ipcfork race`` in a subprocess: report lines and its exit code.

    Called before this process forks anything, so ``RUSAGE_CHILDREN``'s ``ru_maxrss`` is
    the largest of that command and the workers it reaped.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ipcfork", "race"], capture_output=True,
                          text=True, check=False)
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    own = re.search(r"wall time ([\d.]+) s; peak memory \(ru_maxrss\): this process "
                    r"([\d.]+) MiB, largest worker ([\d.]+) MiB", proc.stdout)
    inside = (f"its own report: {own[1]} s inside the command, peak RSS {own[2]} MiB "
              f"(the command), {own[3]} MiB (largest worker)" if own
              else "its report line was not found")
    rss_note = ("" if before.ru_maxrss == 0 else
                f" (children reaped earlier peaked at {before.ru_maxrss / 1024:.1f} MiB)")
    lines = [
        f"default `ipcfork race` (`{os.path.basename(sys.executable)} -m ipcfork race`: "
        f"counter, 4 workers x {race.DEFAULT_ITERATIONS:,}, every default guard): wall time "
        f"{wall:.2f} s, CPU {cpu:.2f} s (user + system, command and workers), peak RSS "
        f"{after.ru_maxrss / 1024:.1f} MiB (ru_maxrss, RUSAGE_CHILDREN){rss_note}; {inside}; "
        f"exit status {proc.returncode}",
    ]
    if proc.returncode != 0:
        lines.append("its stderr: " + proc.stderr.strip()[-500:])
    return lines, proc.returncode


# -- the sweep -------------------------------------------------------------------------------


def workers_for(scenario: str) -> tuple[int, ...]:
    # The deadlock scenario forks at least two workers: 1 would repeat the 2 column.
    return tuple(w for w in WORKERS if w > 1) if scenario == "deadlock" else WORKERS


def sweep(cfg: Config) -> dict[tuple[str, str, int], list[race.RunResult]]:
    """Every (scenario, guard, workers) cell, ``cfg.reps`` results each."""
    cells: dict[tuple[str, str, int], list[race.RunResult]] = {}
    guards = list(race.DEFAULT_GUARDS)
    for rep in range(cfg.reps):
        began = time.monotonic()
        for scenario in race.SCENARIOS:
            for workers in workers_for(scenario):
                for guard in rotated(guards, rep):
                    if race.skip_reason(scenario, guard) is not None:
                        continue
                    result = race.run(scenario, guard, workers, cfg.iterations[scenario],
                                      seed=SEED + rep, lock_timeout=LOCK_TIMEOUT)
                    cells.setdefault((scenario, guard, workers), []).append(result)
        print(f"repetition {rep + 1}/{cfg.reps}: {time.monotonic() - began:.0f} s",
              file=sys.stderr, flush=True)
    return cells


# -- tables ------------------------------------------------------------------------------------


def rate(ops: float) -> str:
    return f"{ops / 1e6:.1f}M/s" if ops >= 1e6 else f"{ops / 1e3:.0f}k/s"


def percent(value: float) -> str:
    if value == 0:
        return "0%"
    return f"{value:.2f}%" if value < 1 else f"{value:.1f}%" if value < 10 else f"{value:.0f}%"


def throughput_table(scenario: str, cells: dict[tuple[str, str, int], list[race.RunResult]],
                     cfg: Config) -> list[str]:
    guards = [g for g in race.DEFAULT_GUARDS if (scenario, g, 1) in cells]
    skipped = [g for g in race.DEFAULT_GUARDS if g not in guards]
    median = {(g, w): statistics.median(r.ops_per_s for r in cells[scenario, g, w])
              for g in guards for w in WORKERS}
    exact = [g for g in guards if race.GUARDS[g].guarded]
    fastest = {w: max(exact, key=lambda g: median[g, w]) for w in RATIO_AT}
    rows = []
    for guard in guards:
        row = [guard]
        for w in WORKERS:
            lost = statistics.median(r.lost_pct for r in cells[scenario, guard, w])
            row.append(f"{rate(median[guard, w])}, {percent(lost)}")
        row += [f"{median[guard, w] / median[fastest[w], w]:.2f}x" for w in RATIO_AT]
        rows.append(tuple(row))
    header = ("guard", *(f"{w} worker" + "s" * (w > 1) for w in WORKERS),
              *(f"vs fastest exact, {w} w" for w in RATIO_AT))
    what = ("items lost (as many deliveries were duplicates)" if scenario == "buffer"
            else "updates lost")
    lines = [f"### {scenario}: {cfg.iterations[scenario]:,} iterations per worker, window 0",
             "", f"Median ops/s (all workers together) and median % of {what}, over "
             f"{cfg.reps} repetition{'s' * (cfg.reps > 1)}. Fastest exact guard: "
             + ", ".join(f"{fastest[w]} at {w} workers" for w in RATIO_AT) + ".", "",
             markdown_table(header, rows)]
    if skipped:
        lines += ["", "Not applicable: " + "; ".join(
            f"`{g}` ({race.skip_reason(scenario, g)})" for g in skipped) + "."]
    lines += ["", spread_line(scenario, cells, guards, WORKERS)]
    return lines


def deadlock_table(cells: dict[tuple[str, str, int], list[race.RunResult]],
                   cfg: Config) -> list[str]:
    counts = workers_for("deadlock")
    guards = [g for g in race.DEFAULT_GUARDS if ("deadlock", g, counts[0]) in cells]
    rows = []
    for guard in guards:
        row = [guard]
        for w in counts:
            results = cells["deadlock", guard, w]
            gave_up = statistics.median_low(r.deadlocked for r in results)
            took = statistics.median(r.elapsed for r in results)
            row.append(f"{gave_up} of {w} gave up, {took:.2f} s")
        rows.append(tuple(row))
    header = ("guard", *(f"{w} workers" for w in counts))
    return [f"### deadlock: a ring of N locks, each taken in opposite order, lock timeout "
            f"{LOCK_TIMEOUT:g} s", "",
            f"Median workers that gave up on their second lock, and median time from the "
            f"first worker's start to the last one's end, over {cfg.reps} "
            f"repetition{'s' * (cfg.reps > 1)}. (One worker cannot deadlock: the scenario "
            f"forks two.)", "", markdown_table(header, rows)]


def spread_line(scenario: str, cells: dict[tuple[str, str, int], list[race.RunResult]],
                guards: Sequence[str], counts: Sequence[int]) -> str:
    spreads = []
    for g in guards:
        for w in counts:
            rates = [r.ops_per_s for r in cells[scenario, g, w]]
            if len(rates) > 1 and min(rates) > 0:
                spreads.append((max(rates) / min(rates), g, w))
    if not spreads:
        return "Spread: one repetition, none to show."
    worst = max(spreads)
    return (f"Spread of ops/s across repetitions (max/min per cell): median "
            f"{statistics.median(s for s, _, _ in spreads):.2f}x, widest {worst[0]:.2f}x "
            f"({worst[1]}, {worst[2]} worker{'s' * (worst[2] > 1)}).")


def failures(cells: dict[tuple[str, str, int], list[race.RunResult]]) -> list[str]:
    return [f"{r.guard} ({r.scenario}, {r.workers} workers: {r.lost:,} lost)"
            for results in cells.values() for r in results if r.failed]


# -- plot ------------------------------------------------------------------------------------


def write_plot(cells: dict[tuple[str, str, int], list[race.RunResult]], path: str) -> None:
    """Medians: throughput per guard for each scenario (top row); unguarded lost updates
    and deadlocked workers (bottom row).  Raises ImportError without matplotlib."""
    plt = require_matplotlib()
    guards = list(race.DEFAULT_GUARDS)
    colour = {g: f"C{i}" for i, g in enumerate(guards)}
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))

    def median_of(scenario: str, guard: str, w: int, field: str) -> float | None:
        results = cells.get((scenario, guard, w))
        return statistics.median(getattr(r, field) for r in results) if results else None

    for ax, scenario in zip(axes[0], ("counter", "transfer", "buffer"), strict=True):
        for guard in guards:
            points = [(w, median_of(scenario, guard, w, "ops_per_s")) for w in WORKERS]
            points = [(w, v) for w, v in points if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=colour[guard],
                        label=guard, linestyle=":" if guard == "none" else "-")
        ax.set_yscale("log")
        ax.set_title(f"{scenario}: median ops/s")
    lost_ax, dead_ax, legend_ax = axes[1]
    for scenario in ("counter", "transfer", "buffer"):
        points = [(w, median_of(scenario, "none", w, "lost_pct")) for w in WORKERS]
        lost_ax.plot(*zip(*points, strict=True), marker="o", label=scenario)
    lost_ax.set_title("unguarded: % of updates lost")
    lost_ax.legend(fontsize="small")
    counts = workers_for("deadlock")
    for guard in guards:
        points = [(w, median_of("deadlock", guard, w, "deadlocked")) for w in counts]
        if all(v is not None for _, v in points):
            dead_ax.plot(*zip(*points, strict=True), marker="o", color=colour[guard])
    dead_ax.plot(counts, counts, color="grey", linestyle="--", linewidth=0.8)
    dead_ax.set_title(f"deadlock: workers that gave up ({LOCK_TIMEOUT:g} s)")
    for ax in [*axes[0], lost_ax, dead_ax]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(WORKERS), [str(w) for w in WORKERS])
        ax.set_xlabel("workers (2 CPUs)")
        ax.grid(True, alpha=0.3)
    legend_ax.axis("off")
    legend_ax.legend(*axes[0][0].get_legend_handles_labels(), loc="center", title="guard")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 repetition, fewer iterations")
    parser.add_argument("--reps", type=int, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"),
                        help="where race.md and race.png go (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.reps is not None:
        cfg = dataclasses.replace(cfg, reps=max(1, args.reps))
    os.makedirs(args.out_dir, exist_ok=True)

    before = testing.snapshot()
    began = time.monotonic()
    env = environment_line()
    print(env, flush=True)
    default_lines, default_status = default_command_run()  # first: nothing reaped yet
    idle = CpuWatch()
    time.sleep(IDLE_CHECK)
    idle_background = idle.background()
    watch = CpuWatch()
    try:
        cells = sweep(cfg)
    except (ipcfork.IpcforkError, OSError, ImportError) as exc:
        print(f"FAILED: a run raised {type(exc).__name__}: {exc}")
        return finish(before, began, ok=False)
    background = watch.background()
    sweep_time = time.monotonic() - began

    failed = failures(cells)
    given = " ".join(sys.argv[1:] if argv is None else argv)
    seeds = f"seed {SEED}" if cfg.reps == 1 else f"seeds {SEED}..{SEED + cfg.reps - 1}"
    out = [f"# ipcfork race: every scenario x guard x workers "
           f"({'quick' if args.quick else 'full'} run)", "", env + "  ", "",
           f"Command: `python benchmarks/bench_race.py{' ' * bool(given)}{given}`; "
           f"guards in rotated order per repetition; {seeds} (one per repetition, the same "
           f"for every guard).", ""]
    for scenario in race.SCENARIOS:
        out += (deadlock_table(cells, cfg) if scenario == "deadlock"
                else throughput_table(scenario, cells, cfg))
        out.append("")
    out += [f"Guarded runs that lost an update: {', '.join(failed) or 'none'}.  ",
            f"Other processes kept {idle_background:.2f} CPUs busy in {IDLE_CHECK:g} s "
            f"of sleep before the sweep, and {background:.2f} during it (CpuWatch); load "
            f"average now {os.getloadavg()[0]:.2f}.  ",
            *(line + "  " for line in default_lines),
            f"This benchmark: {sweep_time:.0f} s until the tables; peak RSS (ru_maxrss) "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB self, "
            f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.1f} MiB "
            f"largest child."]
    markdown = "\n".join(out) + "\n"
    md_path = os.path.join(args.out_dir, "race.md")
    with open(md_path, "w") as md:
        md.write(markdown)
    print(markdown)
    print(f"markdown written to {md_path}")

    png_path = os.path.join(args.out_dir, "race.png")
    try:
        write_plot(cells, png_path)
        print(f"plot written to {png_path} ({os.path.getsize(png_path) / 1024:.0f} KiB)")
    except ImportError as exc:
        print(f"no plot: {exc}")

    return finish(before, began, ok=not failed and default_status == 0)


def finish(before: testing.IpcSnapshot, began: float, ok: bool) -> int:
    """The cleanup check; the exit status (1 if not ``ok``, or if something was left)."""
    leaked = testing.snapshot() - before
    if leaked:  # a concurrent test run's objects come and go; ours would stay
        time.sleep(LEAK_RECHECK)
        again = testing.snapshot() - before
        leaked = dataclasses.replace(
            again, sysv=again.sysv & leaked.sysv, dev_shm=again.dev_shm & leaked.dev_shm,
            dev_mqueue=None if again.dev_mqueue is None
            else again.dev_mqueue & (leaked.dev_mqueue or frozenset()))
    left = testing.children()
    print(f"cleanup: new IPC objects: {leaked.describe()}; child processes left: "
          f"{left or 'none'}; total time {time.monotonic() - began:.0f} s")
    return 0 if ok and not leaked and not left else 1


if __name__ == "__main__":
    sys.exit(main())
