"""The race laboratory: forked workers race over shared memory, unguarded and under each
guard, and the lost updates are counted (``ipcfork race`` on the command line).

Python API::

    from ipcfork import race

    result = race.run("counter", "none", workers=4, iterations=10_000, window=50e-6)
    print(result.lost, result.lost_pct, result.ops_per_s)
    for r in race.sweep(["counter"], race.DEFAULT_GUARDS, workers=[1, 2, 4]):
        print(r.guard, r.workers, r.exact)

    crashed = race.run_crash("mutex-sysv", workers=4, duration=1.0)
    print(crashed.kills, crashed.owner_died, crashed.verdict)  # ... "never wedged"

Scenarios (:data:`SCENARIOS`): ``counter``, ``transfer``, ``buffer``, ``deadlock``; and
``crash`` (:func:`run_crash`, :func:`crash_sweep`), which SIGKILLs workers at random to
see which guards wedge.  Guards (:data:`GUARDS`): ``none``, ``mutex-posix``,
``mutex-sysv``, ``semaphore``, ``counter`` (``ipcfork.SharedCounter``), ``mp-lock``,
``flock``; ``semaphore-sysv`` and ``posix-sem`` (run by default only by ``crash``:
:data:`CRASH_GUARDS`), and ``flock-inherited`` (broken on purpose, never run unless named).
Modules: ``guards`` (what protects), ``scenario`` (the common frame),
``totals``/``buffer``/``deadlock`` (the races), ``runner`` (one run, a sweep),
``crash``/``crashwork``/``crashreport`` (the crash scenario), ``report``/``progress``/
``plot`` (output), ``command`` (the CLI).
"""

from .crash import CRASH_GUARDS, CrashResult, crash_sweep, run_crash
from .guards import ALL_GUARDS, DEFAULT_GUARDS, GUARDS, GuardSpec
from .runner import (
    DEFAULT_ITERATIONS,
    DEFAULT_LOCK_TIMEOUT,
    SCENARIOS,
    RunResult,
    run,
    skip_reason,
    sweep,
)

__all__ = [
    "ALL_GUARDS",
    "CRASH_GUARDS",
    "DEFAULT_GUARDS",
    "DEFAULT_ITERATIONS",
    "DEFAULT_LOCK_TIMEOUT",
    "GUARDS",
    "SCENARIOS",
    "CrashResult",
    "GuardSpec",
    "RunResult",
    "crash_sweep",
    "run",
    "run_crash",
    "skip_reason",
    "sweep",
]
