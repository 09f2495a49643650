"""``ipcfork race``: the command-line face of the race laboratory.

Exit status: 0 when every guarded run was exact, 1 when a guarded run lost an update, a
robust guard wedged in the ``crash`` scenario (or a run failed), 2 for bad arguments, 130
after Ctrl-C and 143 after SIGTERM (every worker killed and reaped, every object removed
first).

``--scenario all`` means the four race scenarios; ``crash`` runs only when named: it is a
robustness test, not a race, with its own guards, knobs and verdicts, and it kills a few
hundred processes a second for about ten seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import IpcforkError
from .cluster import CLUSTER_GUARDS, DEFAULT_CLUSTER_ITERATIONS, cluster_sweep, open_cluster
from .crash import (
    CRASH,
    CRASH_GUARDS,
    DEFAULT_DURATION,
    DEFAULT_KILL_EVERY,
    DEFAULT_STALL,
    KILL_EVERY_LIMITS,
    MAX_DURATION,
    MAX_STALL,
    crash_skip_reason,
    crash_sweep,
)
from .guards import ALL_GUARDS, DEFAULT_GUARDS, GUARDS
from .progress import Progress
from .report import exit_status, format_report, json_document, usage
from .runner import (
    DEFAULT_ITERATIONS,
    DEFAULT_LOCK_TIMEOUT,
    MAX_ITERATIONS,
    MAX_WINDOW,
    MAX_WORKERS,
    SCENARIOS,
    RunResult,
    skip_reason,
    sweep,
)

__all__ = ["add_parser", "default_iterations", "parse_kill_every", "parse_window",
           "run_command"]

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


class _Terminated(Exception):
    """SIGTERM arrived: unwind like Ctrl-C, closing every run's objects."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated
WINDOW_BUDGET = 0.05  # seconds of windows per worker that sets the default iterations
_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*(s|ms|us|µs|ns)?\s*",
                       re.IGNORECASE)


def _seconds(text: str) -> tuple[float, re.Match[str]]:
    match = _DURATION.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: write seconds (0.00005) or a number with a unit "
            f"(50us, 0.5ms)")
    return float(match.group(1)) * _UNITS[(match.group(2) or "").lower()], match


def parse_window(text: str) -> float:
    """``"50us"``, ``"0.5ms"``, ``"0.00005"`` (seconds) -> seconds.

    Raises argparse.ArgumentTypeError naming the form and the limit.
    """
    seconds, match = _seconds(text)
    if seconds > MAX_WINDOW:
        hint = f"; for microseconds write {match.group(1)}us" if not match.group(2) else ""
        raise argparse.ArgumentTypeError(
            f"window must be at most {MAX_WINDOW:g} s, not {seconds:g} s{hint}")
    return seconds


def parse_kill_every(text: str) -> tuple[float, float]:
    """``"0.5ms..4ms"`` -> ``(0.0005, 0.004)``; one duration (``"2ms"``) for a fixed
    interval.

    Raises argparse.ArgumentTypeError naming the form and the limits.
    """
    parts = text.split("..")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"{text!r}: write MIN..MAX, e.g. 0.5ms..4ms")
    low, _ = _seconds(parts[0])
    high, _ = _seconds(parts[-1])
    low_limit, high_limit = KILL_EVERY_LIMITS
    if not low_limit <= low <= high <= high_limit:
        raise argparse.ArgumentTypeError(
            f"kill intervals must satisfy {low_limit * 1e3:g}ms <= MIN <= MAX <= "
            f"{high_limit:g}s, not {text!r}")
    return low, high


def _seconds_in(what: str, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        seconds, _ = _seconds(text)
        if not 0 < seconds <= high:
            raise argparse.ArgumentTypeError(f"{what} must be in (0, {high:g}] s, "
                                             f"not {seconds:g} s")
        return seconds
    return parse


def _int_in(what: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, not {text!r}"
                                             ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be in {low}..{high}, not {value}")
        return value
    return parse


def _workers(text: str) -> list[int]:
    one = _int_in("workers", 1, MAX_WORKERS)
    return [one(part) for part in text.split(",")]


def _scenarios(text: str) -> list[str]:
    names = []
    for part in text.split(","):
        if part == "all":  # the races; crash only when named (see the module docstring)
            names += list(SCENARIOS)
        elif part in SCENARIOS or part == CRASH:
            names.append(part)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown scenario {part!r}; choose from {', '.join(SCENARIOS)}, {CRASH} "
                "or all")
    return list(dict.fromkeys(names))


def _lock_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError(f"lock timeout must be in (0, 60] s, not {value:g}")
    return value


def default_iterations(window: float) -> int:
    """Iterations per worker when none are given: :data:`DEFAULT_ITERATIONS` without a
    window; with one, about :data:`WINDOW_BUDGET` seconds of windows per worker (at least
    100), so guarded runs, which serialise the windows, still end in seconds."""
    if window <= 0:
        return DEFAULT_ITERATIONS
    return max(100, min(DEFAULT_ITERATIONS, int(WINDOW_BUDGET / window)))


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``race`` subcommand to the ``ipcfork`` command's subparsers ``sub``."""
    width = max(map(len, GUARDS))
    guards = "\n".join(f"  {name:{width}}  {spec.description}" for name, spec in GUARDS.items())
    scenarios = "\n".join([*(f"  {name:{width}}  {cls.description}"
                            for name, cls in SCENARIOS.items()),
                          f"  {CRASH:{width}}  workers are SIGKILLed at random; which "
                          "guards wedge?"])
    race: argparse.ArgumentParser = sub.add_parser(
        "race", help="the race laboratory: lost updates with and without guards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Race forked workers over shared memory, unguarded and under each "
                    "guard,\nand count the updates lost.",
        epilog=f"scenarios:\n{scenarios}\n\nguards:\n{guards}\n\nexit status: 0 when "
               "every guarded run is exact, 1 when a guarded run lost\nan update, a robust "
               "guard wedged (crash) or a run failed, 2 for bad\narguments, 130 after "
               "Ctrl-C, 143 after SIGTERM.")
    race.add_argument("--scenario", type=_scenarios, default=["counter"], metavar="NAMES",
                      help=f"{', '.join(SCENARIOS)}, {CRASH} or all (all: every scenario "
                           f"but {CRASH}); a comma list runs several (default: counter)")
    race.add_argument("--guard", action="append", choices=ALL_GUARDS, metavar="NAME",
                      help="run this guard (repeatable; default: "
                           f"{', '.join(DEFAULT_GUARDS)}; for {CRASH}: "
                           f"{', '.join(CRASH_GUARDS)})")
    race.add_argument("--workers", type=_workers, default=[4], metavar="N[,N...]",
                      help=f"workers per run, 1..{MAX_WORKERS}; a comma list like 1,2,4,8 "
                           "sweeps (default: 4)")
    race.add_argument("-k", "--iterations", type=_int_in("iterations", 1, MAX_ITERATIONS),
                      metavar="K", help=f"updates per worker, 1..{MAX_ITERATIONS} "
                      f"(default: {DEFAULT_ITERATIONS:,}; with --window, about "
                      f"{WINDOW_BUDGET:g} s of windows per worker)")
    race.add_argument("--window", type=parse_window, default=0.0, metavar="DURATION",
                      help="gap between read and write: seconds or 50us, 2ms; at most "
                           f"{MAX_WINDOW:g} s (default: 0)")
    race.add_argument("--seed", type=int, help="seed for random choices (default: random)")
    race.add_argument("--lock-timeout", type=_lock_timeout, default=DEFAULT_LOCK_TIMEOUT,
                      metavar="SECONDS", help="how long a deadlocked worker waits for its "
                      f"second lock, (0, 60] (default: {DEFAULT_LOCK_TIMEOUT:g})")
    race.add_argument("--duration", type=_seconds_in("duration", MAX_DURATION),
                      default=DEFAULT_DURATION, metavar="DURATION",
                      help=f"{CRASH}: how long each guard is under fire, at most "
                           f"{MAX_DURATION:g} s (default: {DEFAULT_DURATION:g}s)")
    race.add_argument("--kill-every", type=parse_kill_every, default=DEFAULT_KILL_EVERY,
                      metavar="MIN..MAX", help=f"{CRASH}: time between two SIGKILLs, drawn "
                      "uniformly (default: "
                      f"{DEFAULT_KILL_EVERY[0] * 1e3:g}ms..{DEFAULT_KILL_EVERY[1] * 1e3:g}ms)")
    race.add_argument("--stall", type=_seconds_in("stall", MAX_STALL), default=DEFAULT_STALL,
                      metavar="DURATION", help=f"{CRASH}: no increment for this long and "
                      f"the guard is wedged, at most {MAX_STALL:g} s (default: "
                      f"{DEFAULT_STALL:g}s)")
    race.add_argument("--cluster", metavar="ADDRESS",
                      help="run the counter scenario across a dask cluster's workers "
                           "(tcp://host:8786, or local for a LocalCluster), comparing "
                           f"{', '.join(CLUSTER_GUARDS)} (default iterations: "
                           f"{DEFAULT_CLUSTER_ITERATIONS})")
    race.add_argument("--json", action="store_true",
                      help="print one JSON document on stdout instead of tables")
    race.add_argument("--plot", metavar="FILE.png",
                      help="draw lost updates and throughput per guard (needs matplotlib)")
    race.set_defaults(run=run_command, race_parser=race)
    return race


def _check_plot(args: argparse.Namespace) -> None:
    """Refuse ``--plot`` before running anything if it could not be drawn."""
    parser: argparse.ArgumentParser = args.race_parser
    if args.plot is None:
        return
    from .plot import require_matplotlib

    try:
        require_matplotlib()
    except ImportError as exc:
        parser.error(str(exc))
    folder = os.path.dirname(os.path.abspath(args.plot))
    if not os.path.isdir(folder):
        parser.error(f"--plot: no such directory: {folder}")


def _results(args: argparse.Namespace, config: dict[str, Any], guards: list[str],
             crash_guards: list[str], progress: Progress) -> Iterator[RunResult]:
    """Every run the arguments ask for, scenario by scenario in the order given."""
    for scenario in args.scenario:
        if scenario == CRASH:
            yield from crash_sweep(crash_guards, args.workers, args.duration,
                                   args.kill_every, args.stall, config["seed"],
                                   on_start=progress.start)
        else:
            yield from sweep([scenario], guards, args.workers, config["iterations"],
                             args.window, config["seed"], lock_timeout=args.lock_timeout,
                             on_start=progress.start)


def _cluster_results(args: argparse.Namespace, config: dict[str, Any]) -> Iterator[RunResult]:
    """``--cluster``: the counter scenario across a dask cluster (see ``cluster.py``)."""
    parser: argparse.ArgumentParser = args.race_parser
    if args.scenario != ["counter"] or args.window:
        parser.error("--cluster runs the counter scenario only, without --window")
    wrong = [g for g in config["guards"] if g not in CLUSTER_GUARDS]
    if wrong:
        parser.error(f"--cluster runs the guards {', '.join(CLUSTER_GUARDS)}, not "
                     f"{', '.join(wrong)}")
    with open_cluster(args.cluster, max(args.workers)) as client:
        print(f"dask cluster {client.scheduler.address}: "
              f"{len(client.scheduler_info()['workers'])} worker processes", file=sys.stderr)
        yield from cluster_sweep(client, config["guards"], args.workers, config["iterations"])


def run_command(args: argparse.Namespace) -> int:
    """Run ``ipcfork race`` with parsed ``args``; returns the exit status."""
    _check_plot(args)
    began = time.monotonic()
    window: float = args.window
    guards: list[str] = list(dict.fromkeys(args.guard or DEFAULT_GUARDS))
    crash_guards: list[str] = list(dict.fromkeys(args.guard or CRASH_GUARDS))
    races = [s for s in args.scenario if s != CRASH]
    config: dict[str, Any] = {
        "scenarios": args.scenario, "guards": guards, "workers": args.workers,
        "iterations": args.iterations or default_iterations(window), "window": window,
        "seed": args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big"),
        "lock_timeout": args.lock_timeout,
    }
    if args.cluster is not None:
        config["cluster"] = args.cluster
        config["guards"] = list(dict.fromkeys(args.guard or CLUSTER_GUARDS))
        config["iterations"] = args.iterations or DEFAULT_CLUSTER_ITERATIONS
    if not races:  # the race knobs would only mislead: crash has its own
        for key in ("guards", "iterations", "window", "lock_timeout"):
            del config[key]
    runnable = sum(skip_reason(s, g) is None for s in races for g in guards)
    if CRASH in args.scenario:
        config["crash"] = {"guards": crash_guards, "duration": args.duration,
                           "kill_every": list(args.kill_every), "stall": args.stall}
        runnable += sum(crash_skip_reason(g) is None for g in crash_guards)
    progress = Progress(runnable * len(args.workers))
    results: list[RunResult] = []
    # SIGTERM becomes an exception, so every run's objects are closed on the way out (the
    # default action would end the process before any cleanup ran).
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.cluster is not None:
            results.extend(_cluster_results(args, config))
        else:
            results.extend(_results(args, config, guards, crash_guards, progress))
    except (KeyboardInterrupt, _Terminated) as exc:
        progress.clear()
        print("ipcfork race: interrupted; workers stopped, nothing left behind",
              file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
    except (IpcforkError, OSError, ImportError) as exc:
        progress.clear()
        print(f"ipcfork race: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    progress.clear()
    status = exit_status(results)
    if args.plot is not None:
        from .plot import write_plot

        try:
            write_plot(results, args.plot)
        except OSError as exc:
            print(f"ipcfork race: cannot write the plot: {exc}", file=sys.stderr)
            status = 1
    use = usage(time.monotonic() - began)
    if args.json:
        doc = json_document(results, config, use)
        if args.plot is not None:
            doc["plot"] = args.plot
        print(json.dumps(doc, indent=2))
    else:
        print(format_report(results, use))
        if args.plot is not None and status == exit_status(results):
            print(f"plot written to {args.plot}")
    return status
