"""One run of one scenario under one guard (:func:`run`), and sweeps of many (:func:`sweep`).

A run creates its shared objects, forks its workers with a :class:`~ipcfork.ForkPool` (one
task, so one fresh child, per worker), lines them up on a :class:`~ipcfork.Barrier` so the
contention is real from the first iteration, and closes everything it made when it ends,
whether it ends well, with an error, or with Ctrl-C (the pool kills and reaps the children
and re-raises KeyboardInterrupt; the ``with`` blocks here close the objects on the way out).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from .._common import check_count
from ..barrier import Barrier
from ..errors import BrokenBarrierError, ChildCrashedError, InvalidArgumentError
from ..pool import ForkPool
from .buffer import BufferScenario
from .deadlock import DeadlockScenario
from .guards import DEFAULT_GUARDS, guard_spec, unavailable
from .scenario import Config, Scenario, shared_view
from .totals import CounterScenario, TransferScenario

__all__ = [
    "DEFAULT_ITERATIONS",
    "DEFAULT_LOCK_TIMEOUT",
    "MAX_ITERATIONS",
    "MAX_WINDOW",
    "MAX_WORKERS",
    "SCENARIOS",
    "RunResult",
    "run",
    "skip_reason",
    "sweep",
]

SCENARIOS: dict[str, type[Scenario]] = {cls.name: cls for cls in (
    CounterScenario, TransferScenario, BufferScenario, DeadlockScenario)}
DEFAULT_ITERATIONS = 50_000  # with no window: 40-65% lost unguarded on 2 cores, ~3 s in all
DEFAULT_LOCK_TIMEOUT = 0.5
MAX_WORKERS = 64
MAX_ITERATIONS = 10_000_000
MAX_WINDOW = 1.0
START_WAIT = 60.0  # seconds the workers wait for each other at the start line
_PROGRESS_EVERY = 0.1  # seconds between progress callbacks


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run (or why it was skipped: ``skipped`` says, the counts are 0).

    ``lost`` counts updates lost (ids lost in ``buffer``), ``duplicated`` deliveries of an
    item beyond its first (``buffer`` only), ``deadlocked`` workers that gave up on a lock
    (``deadlock`` only).  ``elapsed`` runs from the first worker's start to the last one's
    end; ``failed`` is True when a guard that claims to protect the data did not.
    """

    scenario: str
    guard: str
    workers: int
    iterations: int
    window: float
    seed: int
    expected: int = 0
    observed: int = 0
    updates: int = 0
    lost: int = 0
    duplicated: int = 0
    deadlocked: int = 0
    exact: bool = True
    guarded: bool = False
    failed: bool = False
    elapsed: float = 0.0
    ops_per_s: float = 0.0
    max_worker_rss_kib: int = 0
    note: str | None = None
    skipped: str | None = None

    @property
    def lost_pct(self) -> float:
        """Lost updates as a percentage of the updates attempted."""
        return 100.0 * self.lost / self.updates if self.updates else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields and ``lost_pct``, for JSON."""
        return {**asdict(self), "lost_pct": round(self.lost_pct, 4)}


def skip_reason(scenario: str, guard: str) -> str | None:
    """Why ``guard`` cannot run ``scenario`` here (not applicable, or not available), or
    None.  Raises InvalidArgumentError for an unknown scenario or guard."""
    spec, cls = guard_spec(guard), scenario_class(scenario)
    if spec.kind not in cls.kinds:
        return cls.not_applicable or f"{guard} does not apply to {scenario}"
    return unavailable(guard)


def scenario_class(name: str) -> type[Scenario]:
    """The scenario called ``name``.  Raises InvalidArgumentError naming the known ones."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}",
            limit=f"one of {', '.join(SCENARIOS)}") from None


def _check_window(window: float) -> float:
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not (
            0.0 <= window <= MAX_WINDOW):
        raise InvalidArgumentError(f"window must be 0..{MAX_WINDOW} s, not {window!r}",
                                   limit=f"0..{MAX_WINDOW} s")
    return float(window)


def _check_lock_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0.0 < timeout <= 60.0):
        raise InvalidArgumentError(f"lock_timeout must be in (0, 60] s, not {timeout!r}",
                                   limit="0 < lock_timeout <= 60 s")
    return float(timeout)


def run(scenario: str = "counter", guard: str = "none", workers: int = 4,
        iterations: int = DEFAULT_ITERATIONS, window: float = 0.0, seed: int | None = None,
        *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        progress: Callable[[float], None] | None = None) -> RunResult:
    """Run ``scenario`` once with ``workers`` forked workers guarded by ``guard``.

    ``iterations`` per worker; ``window`` seconds between each read and its write (0: none);
    ``seed`` for the random choices (None: a random seed, reported in the result);
    ``lock_timeout`` bounds each lock wait of the deadlock scenario; ``progress(fraction)``
    is called in this process about ten times a second while the workers run.

    Raises InvalidArgumentError for an unknown scenario or guard, a guard that does not
    apply to the scenario (see :func:`skip_reason`) or a number out of range (the message
    names the limit); ImportError when the guard is not available in this version; the
    first worker's exception if a worker failed; KeyboardInterrupt on Ctrl-C, after every
    worker was killed and reaped and every object closed.
    """
    spec, cls = guard_spec(guard), scenario_class(scenario)
    check_count(workers, "workers", low=1, high=MAX_WORKERS)
    check_count(iterations, "iterations", low=1, high=MAX_ITERATIONS)
    config = Config(workers=cls.workers_for(workers),
                    iterations=cls.iterations_for(iterations), window=_check_window(window),
                    seed=seed if seed is not None else int.from_bytes(os.urandom(4), "big"),
                    lock_timeout=_check_lock_timeout(lock_timeout))
    if spec.kind not in cls.kinds:
        raise InvalidArgumentError(f"guard {guard!r} does not apply to {scenario!r}: "
                                   f"{skip_reason(scenario, guard)}")
    why = unavailable(guard)
    if why is not None:
        raise ImportError(why)
    with contextlib.ExitStack() as stack:
        state = cls(config, spec, stack)
        outcomes, rss = _run_workers(state, config, stack, progress)
        tally = state.tally([result for _, _, result in outcomes])
    elapsed = max(end for _, end, _ in outcomes) - min(start for start, _, _ in outcomes)
    ops = config.workers * config.iterations
    return RunResult(
        scenario=scenario, guard=guard, workers=config.workers,
        iterations=config.iterations, window=config.window, seed=config.seed,
        expected=tally.expected, observed=tally.observed, updates=tally.updates,
        lost=tally.lost, duplicated=tally.duplicated, deadlocked=tally.deadlocked,
        exact=tally.exact, guarded=spec.guarded,
        failed=spec.guarded and cls.judged and not tally.exact, elapsed=elapsed,
        ops_per_s=ops / elapsed if elapsed > 0 else 0.0, max_worker_rss_kib=rss,
        note=tally.note)


def _now() -> float:
    # CLOCK_MONOTONIC is one clock for every process on the machine: starts and ends taken
    # in different workers compare.
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _run_workers(state: Scenario, config: Config, stack: contextlib.ExitStack,
                 progress: Callable[[float], None] | None,
                 ) -> tuple[list[tuple[float, float, Any]], int]:
    """Fork the workers, wait for them; their ``(start, end, result)`` and max RSS (KiB)."""
    start_line = Barrier(config.workers)
    stack.callback(start_line.close)
    done = shared_view(stack, "Q", config.workers)  # iterations each worker has finished

    def worker(index: int) -> tuple[float, float, Any]:
        def report(count: int) -> None:
            done[index] = count

        try:
            state.attach()
            state.prepare(index)
            start_line.wait(timeout=START_WAIT)
        except BaseException:
            start_line.abort()  # the others would wait for us until START_WAIT
            raise
        start = _now()
        result = state.work(index, report)
        return start, _now(), result

    total = config.workers * config.iterations
    with ForkPool(max_workers=config.workers) as pool:
        futures = [pool.submit(worker, index) for index in range(config.workers)]
        pending: set[concurrent.futures.Future[Any]] = set(futures)
        while pending:
            finished, pending = concurrent.futures.wait(
                pending, timeout=_PROGRESS_EVERY if progress else None,
                return_when=concurrent.futures.FIRST_EXCEPTION)
            if any(future.exception() is not None for future in finished):
                _stop_the_others(start_line, futures)
                break
            if progress is not None:
                progress(min(1.0, sum(done.tolist()) / total))
        concurrent.futures.wait(futures)
        _raise_first_failure(futures)
        outcomes = [future.result() for future in futures]
        rss = max(future.record.maxrss_kib or 0 for future in futures)
    return outcomes, rss


def _stop_the_others(start_line: Barrier, futures: list[Any]) -> None:
    """A worker failed (or was killed): the others may wait for it forever, at the start
    line or on a lock it held that no one will release (a semaphore is not robust), so
    break the start line and kill them."""
    start_line.abort()
    for future in futures:
        if not future.done() and not future.cancel() and future.record.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(future.record.pid, signal.SIGKILL)


def _raise_first_failure(futures: list[Any]) -> None:
    """Raise the error that started it: a worker's own error before the broken start
    lines and the kills it caused in the others."""
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
    if errors:
        first = next((e for e in errors if not isinstance(
            e, (BrokenBarrierError, ChildCrashedError))), errors[0])
        raise first


def sweep(scenarios: Iterable[str] = ("counter",), guards: Iterable[str] = DEFAULT_GUARDS,
          workers: Iterable[int] = (4,), iterations: int = DEFAULT_ITERATIONS,
          window: float = 0.0, seed: int | None = None, *,
          lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
          on_start: Callable[[str, str, int], Callable[[float], None] | None] | None = None,
          ) -> Iterator[RunResult]:
    """:func:`run` every scenario x workers x guard, in that order, yielding each result.

    A guard that does not apply or is not available yields a result with ``skipped`` set.
    ``on_start(scenario, guard, workers)`` is called before each run and may return a
    progress callback for it.  Raises as :func:`run` does.
    """
    guards, workers = list(guards), list(workers)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")  # one seed for the whole sweep
    for scenario in scenarios:
        cls = scenario_class(scenario)
        for count in workers:
            for guard in guards:
                why = skip_reason(scenario, guard)
                if why is not None:
                    yield RunResult(scenario=scenario, guard=guard,
                                    workers=cls.workers_for(count),
                                    iterations=cls.iterations_for(iterations), window=window,
                                    seed=seed, guarded=guard_spec(guard).guarded, skipped=why)
                    continue
                progress = on_start(scenario, guard, count) if on_start else None
                yield run(scenario, guard, count, iterations, window, seed,
                          lock_timeout=lock_timeout, progress=progress)
