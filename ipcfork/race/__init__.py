"""The race laboratory: forked workers race over shared memory, unguarded and under each
guard, and the lost updates are counted (``ipcfork race`` on the command line).

Python API::

    from ipcfork import race

    result = race.run("counter", "none", workers=4, iterations=10_000, window=50e-6)
    print(result.lost, result.lost_pct, result.ops_per_s)
    for r in race.sweep(["counter"], race.DEFAULT_GUARDS, workers=[1, 2, 4]):
        print(r.guard, r.workers, r.exact)

Scenarios (:data:`SCENARIOS`): ``counter``, ``transfer``, ``buffer``, ``deadlock``.
Guards (:data:`GUARDS`): ``none``, ``mutex-posix``, ``mutex-sysv``, ``semaphore``,
``counter`` (``ipcfork.SharedCounter``), ``mp-lock``, ``flock``, and ``flock-inherited``
(broken on purpose, never run unless named).  Modules: ``guards`` (what protects),
``scenario`` (the common frame), ``totals``/``buffer``/``deadlock`` (the races), ``runner``
(one run, a sweep), ``report``/``progress``/``plot`` (output), ``command`` (the CLI).
"""

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
    "DEFAULT_GUARDS",
    "DEFAULT_ITERATIONS",
    "DEFAULT_LOCK_TIMEOUT",
    "GUARDS",
    "SCENARIOS",
    "GuardSpec",
    "RunResult",
    "run",
    "skip_reason",
    "sweep",
]
