"""The ``crash`` scenario: the robustness counterpart of the lost update.

Workers increment one shared counter under a guard, as in ``counter``, and never stop.  The
parent SIGKILLs a random worker every few milliseconds (a random interval drawn from
``kill_every``) and forks a replacement into its place, for ``duration`` seconds per guard.
A kill that lands while its victim holds the lock is the test: a robust lock is given back
(by the kernel, or by the next waiter) and its next holder is told that the owner died; a
lock with no owner stays taken and every worker waits for ever.  The parent watches the
increments: none for ``stall`` seconds and the guard is *wedged*, so its run stops at once
(every worker killed and reaped).  After the last kill the run waits for one more increment
(or for the stall threshold): "never wedged" means progress resumed after every kill.

What is measured, per worker position (a replacement takes its victim's position and goes
on from its numbers) in the bookkeeping of :mod:`.crashwork`: increments recorded, a flag
set inside the critical section (so the parent knows whether a victim died holding the
lock), and the owner deaths the guard reported (``ipcfork.Mutex``'s
``previous_owner_died``; other guards cannot tell, and report None rather than 0).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .._common import check_count
from ..errors import ChildCrashedError, InvalidArgumentError, WaitTimeoutError
from ..pool import ForkPool
from .crashwork import Target
from .guards import guard_spec, unavailable
from .runner import MAX_WORKERS, RunResult

__all__ = [
    "CRASH",
    "CRASH_GUARDS",
    "DEFAULT_DURATION",
    "DEFAULT_KILL_EVERY",
    "DEFAULT_STALL",
    "CrashResult",
    "check_kill_every",
    "crash_skip_reason",
    "crash_sweep",
    "run_crash",
]

CRASH = "crash"  # the scenario's name on the command line and in results
CRASH_GUARDS = ("mutex-posix", "mutex-sysv", "semaphore", "semaphore-sysv", "counter",
                "posix-sem", "mp-lock", "flock")
DEFAULT_DURATION = 1.5  # seconds under fire per guard: 8 guards in about 10 s on 2 cores
DEFAULT_KILL_EVERY = (0.0005, 0.004)  # seconds between two kills: uniform in this range
DEFAULT_STALL = 1.0  # seconds without an increment that make a guard wedged
MAX_DURATION = 600.0
MAX_STALL = 60.0
KILL_EVERY_LIMITS = (0.0001, 1.0)
START_WAIT = 30.0  # seconds for the first workers to make their first increment
REAP_WAIT = 10.0  # seconds for a SIGKILLed worker to be reaped (a D-state sleep at worst)
_SETTLE_POLL = 0.001  # seconds between two looks at the counter once the kills stopped


@dataclass(frozen=True)
class CrashResult(RunResult):
    """One guard under fire.  As a :class:`RunResult`: ``observed`` is the counter's final
    value, ``expected`` and ``updates`` the increments the workers recorded, ``lost`` how
    many recorded increments the counter lacks (0 unless the guard let two holders in),
    ``exact`` whether the counter is within ``[recorded, recorded + kills + workers]``, and
    ``failed`` whether a robust guard wedged or the count is off.

    ``kills``: SIGKILLs sent while the guard was under fire (those that end the run are not
    counted); ``kills_in_cs``: those whose victim had its in-critical-section flag set, a
    lower bound (None for the atomic guard, which has no critical section);
    ``owner_died``: acquisitions that reported the previous owner dead (None for guards
    that cannot tell); ``longest_stall``: the longest time, in seconds, without a new
    increment; ``wedged_after``: the kill after which no increment came (None if never
    wedged); ``in_flight``: counter minus recorded.
    """

    duration: float = 0.0
    kill_every: tuple[float, float] = (0.0, 0.0)
    stall_threshold: float = 0.0
    kills: int = 0
    kills_in_cs: int | None = None
    owner_died: int | None = None
    longest_stall: float = 0.0
    wedged: bool = False
    wedged_after: int | None = None
    in_flight: int = 0
    spawned: int = 0
    robust: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The fields, ``lost_pct`` and ``verdict``, for JSON."""
        return {**super().to_dict(), "verdict": self.verdict}

    @property
    def verdict(self) -> str:
        """``"wedged after N kills"`` or ``"never wedged"`` (or why it was skipped)."""
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.wedged:
            return f"wedged after {self.wedged_after:,} kill" + (
                "s" if self.wedged_after != 1 else "")
        return "never wedged"


def crash_skip_reason(guard: str) -> str | None:
    """Why ``guard`` cannot run the crash scenario here, or None.  Raises
    InvalidArgumentError for an unknown guard."""
    if guard_spec(guard).kind == "none":
        return "no guard: nothing to wedge"
    return unavailable(guard)


def _check_seconds(value: float, what: str, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 < value <= high):
        raise InvalidArgumentError(f"{what} must be in (0, {high:g}] s, not {value!r}",
                                   limit=f"0 < {what} <= {high:g} s")
    return float(value)


def check_kill_every(pair: Iterable[float]) -> tuple[float, float]:
    """``(low, high)`` seconds between kills, checked.  Raises InvalidArgumentError unless
    both are numbers and ``KILL_EVERY_LIMITS[0] <= low <= high <= KILL_EVERY_LIMITS[1]``."""
    low_limit, high_limit = KILL_EVERY_LIMITS
    try:
        low, high = pair
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"kill_every must be a (low, high) pair, not {pair!r}",
                                   limit="two numbers of seconds") from None
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                low_limit <= value <= high_limit):
            raise InvalidArgumentError(
                f"kill intervals must be in [{low_limit:g}, {high_limit:g}] s, not {value!r}",
                limit=f"{low_limit:g}..{high_limit:g} s")
    if low > high:
        raise InvalidArgumentError(f"kill_every: low {low:g} s is above high {high:g} s",
                                   limit="low <= high")
    return float(low), float(high)


def run_crash(guard: str = "mutex-sysv", workers: int = 4,
              duration: float = DEFAULT_DURATION,
              kill_every: tuple[float, float] = DEFAULT_KILL_EVERY,
              stall: float = DEFAULT_STALL, seed: int | None = None, *,
              progress: Callable[[float], None] | None = None) -> CrashResult:
    """Put ``guard`` under fire: ``workers`` forked workers increment a shared counter
    under it while a random one is SIGKILLed (and replaced) every ``kill_every`` seconds
    (a ``(low, high)`` range, uniform) for ``duration`` seconds; ``stall`` seconds without
    an increment end the run as wedged.  ``seed`` drives the victims and intervals (None:
    random, reported); ``progress(fraction)`` is called in this process as time passes.

    Raises InvalidArgumentError for an unknown guard, ``none``, or a number out of range
    (the message names the limit); ImportError when the guard is not available here;
    WaitTimeoutError when the first workers make no increment within ``START_WAIT`` s or a
    SIGKILLed worker is not reaped within ``REAP_WAIT`` s; a worker's own exception if one
    failed; KeyboardInterrupt on Ctrl-C, after every worker was killed and reaped and every
    object closed.
    """
    spec = guard_spec(guard)
    check_count(workers, "workers", low=1, high=MAX_WORKERS)
    duration = _check_seconds(duration, "duration", MAX_DURATION)
    stall = _check_seconds(stall, "stall", MAX_STALL)
    kill_every = check_kill_every(kill_every)
    if spec.kind == "none":
        raise InvalidArgumentError(f"guard {guard!r} does not apply to {CRASH!r}: "
                                   f"{crash_skip_reason(guard)}")
    why = unavailable(guard)
    if why is not None:
        raise ImportError(why)
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
    with contextlib.ExitStack() as stack:
        target = Target(spec, workers, stack)
        storm = _Storm(target, random.Random(seed), kill_every, stall)
        with ForkPool(max_workers=workers) as pool:
            try:
                storm.run(pool, duration, progress)
            finally:
                # Every worker killed and reaped before the objects close, wedged or not.
                pool.abort(signal.SIGKILL, kill_now=True)
        storm.collect_rss()
        observed, recorded = target.observed(), target.recorded()
        owner_died = target.owner_deaths()
    in_flight = observed - recorded
    exact = 0 <= in_flight <= storm.kills + workers  # one per kill, those ending it too
    return CrashResult(
        scenario=CRASH, guard=guard, workers=workers, iterations=0, window=0.0, seed=seed,
        expected=recorded, observed=observed, updates=recorded, lost=max(0, -in_flight),
        exact=exact, guarded=True, failed=(spec.robust and storm.wedged) or not exact,
        elapsed=storm.elapsed, ops_per_s=observed / storm.elapsed if storm.elapsed else 0.0,
        max_worker_rss_kib=storm.rss, duration=duration, kill_every=kill_every,
        stall_threshold=stall, kills=storm.kills,
        kills_in_cs=storm.in_cs if target.has_critical_section else None,
        owner_died=owner_died, longest_stall=storm.longest,
        wedged=storm.wedged, wedged_after=storm.wedged_after(), in_flight=in_flight,
        spawned=storm.spawned, robust=spec.robust)


class _Storm:
    """The parent's side: fork the workers, kill and replace them, watch the progress.

    Kills do not wait for their victim: a victim is reaped by the pool's manager thread,
    and its replacement forked at the next look after that, so the kills keep to their
    intervals however long a reap and a fork take on a busy machine.
    """

    def __init__(self, target: Target, rng: random.Random, kill_every: tuple[float, float],
                 stall: float) -> None:
        self.target = target
        self.rng = rng
        self.kill_every = kill_every
        self.stall = stall
        self.slots: list[Any] = []  # the future of the worker at each position
        # position -> (kill number, when, future) of each victim not yet replaced
        self.dying: dict[int, tuple[int, float, Any]] = {}
        self.finished: list[Any] = []  # futures of the workers reaped so far
        self.kills = self.in_cs = self.spawned = self.rss = 0
        self.wedged = False
        self.elapsed = self.longest = 0.0
        self.last_total = 0
        self.last_progress = time.monotonic()
        # Kills known to have come before the latest increment seen (a guard that wedges
        # was wedged by the next one), and what the next increment seen may be credited
        # with: the kills whose victims were all reaped when the total was last read.
        self.kills_before_progress = 0
        self._credit = 0
        self._reaped: set[int] = set()  # kill numbers reaped beyond the first unbroken run
        self._reaped_run = 0  # kills 1..this are all reaped

    def wedged_after(self) -> int | None:
        """The kill that wedged the guard: the first after the last increment (None if
        it never wedged; the kill count if it stalled with no kill after an increment)."""
        return min(self.kills, self.kills_before_progress + 1) if self.wedged else None

    def _observe(self) -> float:
        """Look at the recorded total; returns the seconds since it last moved.

        A move seen now happened after the last look, when every victim counted in
        ``_credit`` was dead already: a lock one of them held was not left taken.
        """
        now, total = time.monotonic(), self.target.recorded()
        if total != self.last_total:
            self.longest = max(self.longest, now - self.last_progress)
            self.last_total, self.last_progress = total, now
            self.kills_before_progress = self._credit
        self._credit = self._reaped_run
        return now - self.last_progress

    def _spawn(self, pool: ForkPool, position: int) -> Any:
        self.spawned += 1
        return pool.submit(self.target.work, position)

    def _check_workers(self) -> None:
        """Raise the error of a worker that ended without being killed by us."""
        for position, future in enumerate(self.slots):
            if position not in self.dying and future.done():
                exc = future.exception()
                raise exc if exc is not None else ChildCrashedError(
                    "a crash worker returned, which it never does")

    def _replace_reaped(self, pool: ForkPool) -> None:
        """For each victim reaped since the last look: read whether it died inside the
        critical section and fork its replacement.  Raises WaitTimeoutError for a victim
        not reaped within ``REAP_WAIT`` s, or a victim's own error if it failed before
        the kill landed."""
        now = time.monotonic()
        for position, (number, killed_at, future) in list(self.dying.items()):
            if not future.done():
                if now - killed_at > REAP_WAIT:
                    raise WaitTimeoutError(f"worker {future.record.pid} was not reaped "
                                           f"{REAP_WAIT:g} s after SIGKILL",
                                           limit=f"{REAP_WAIT:g} s")
                continue
            exc = future.exception()
            if not (isinstance(exc, ChildCrashedError) and exc.signal == signal.SIGKILL):
                # It had already failed on its own before the kill landed: that counts.
                raise exc if exc is not None else ChildCrashedError(
                    "a crash worker returned, which it never does")
            del self.dying[position]
            self.finished.append(future)
            self.in_cs += self.target.take_flag(position)
            self.slots[position] = self._spawn(pool, position)
            self._reaped.add(number)
            while self._reaped_run + 1 in self._reaped:
                self._reaped_run += 1
                self._reaped.discard(self._reaped_run)

    def _kill(self) -> None:
        """SIGKILL a random live worker (one forked and not already killed), if any."""
        live = [i for i, f in enumerate(self.slots)
                if i not in self.dying and f.record.pid and not f.done()]
        if not live:
            return
        position = self.rng.choice(live)
        future = self.slots[position]
        with contextlib.suppress(ProcessLookupError):  # a zombie still takes the signal
            os.kill(future.record.pid, signal.SIGKILL)
        self.kills += 1
        self.dying[position] = (self.kills, time.monotonic(), future)

    def run(self, pool: ForkPool, duration: float,
            progress: Callable[[float], None] | None) -> None:
        """Start the workers, kill for ``duration`` seconds, then let it settle (raises as
        :func:`run_crash` does)."""
        self.slots = [self._spawn(pool, i) for i in range(self.target.workers)]
        began = time.monotonic()
        while self.target.recorded() == 0:  # under way: every fork may take a while
            self._check_workers()
            if time.monotonic() - began > START_WAIT:
                raise WaitTimeoutError(f"the crash workers made no increment in "
                                       f"{START_WAIT:g} s", limit=f"{START_WAIT:g} s")
            time.sleep(_SETTLE_POLL)
        start = time.monotonic()
        self.last_progress, self.last_total = start, self.target.recorded()
        try:
            self._storm(pool, start, duration, progress)
            if not self.wedged:
                self._settle(pool)
        finally:
            self.elapsed = time.monotonic() - start
            self.longest = max(self.longest, time.monotonic() - self.last_progress)

    def _storm(self, pool: ForkPool, start: float, duration: float,
               progress: Callable[[float], None] | None) -> None:
        """Kill and replace random workers at random intervals for ``duration`` seconds;
        stops early, with ``wedged`` set, once the workers stalled for the threshold."""
        low, high = self.kill_every
        end = start + duration
        due = start
        while (now := time.monotonic()) < end:
            if progress is not None:
                progress(min(1.0, (now - start) / duration))
            # Kills are due at fixed times, so a late wake-up (the pool's thread holding the
            # GIL) does not stretch every later interval; a backlog is dropped, not burst.
            due = max(due + self.rng.uniform(low, high), now - high)
            time.sleep(max(0.0, due - now))
            self._replace_reaped(pool)
            self._check_workers()
            if self._observe() >= self.stall:
                self.wedged = True
                return
            self._kill()

    def _settle(self, pool: ForkPool) -> None:
        """No more kills: wait for an increment after the last one, or the threshold."""
        while self.kills_before_progress < self.kills:
            time.sleep(_SETTLE_POLL)
            self._replace_reaped(pool)
            self._check_workers()
            if self._observe() >= self.stall:
                self.wedged = True
                return

    def collect_rss(self) -> None:
        """The largest peak RSS of every worker reaped (call after the pool stopped)."""
        futures = self.finished + self.slots
        self.rss = max((f.record.maxrss_kib or 0 for f in futures), default=0)


def crash_sweep(guards: Iterable[str] = CRASH_GUARDS, workers: Iterable[int] = (4,),
                duration: float = DEFAULT_DURATION,
                kill_every: tuple[float, float] = DEFAULT_KILL_EVERY,
                stall: float = DEFAULT_STALL, seed: int | None = None, *,
                on_start: Callable[[str, str, int], Callable[[float], None] | None]
                | None = None) -> Iterator[CrashResult]:
    """:func:`run_crash` for every worker count x guard, yielding each result.

    A guard that does not apply or is not available yields a result with ``skipped`` set;
    ``on_start(CRASH, guard, workers)`` is called before each run and may return its
    progress callback.  Raises as :func:`run_crash` does.
    """
    guards, counts = list(guards), list(workers)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "big")  # one seed for the whole sweep
    for count in counts:
        for guard in guards:
            why = crash_skip_reason(guard)
            if why is not None:
                yield CrashResult(scenario=CRASH, guard=guard, workers=count, iterations=0,
                                  window=0.0, seed=seed, guarded=True, skipped=why,
                                  duration=duration, kill_every=kill_every,
                                  stall_threshold=stall, robust=guard_spec(guard).robust)
                continue
            progress = on_start(CRASH, guard, count) if on_start else None
            yield run_crash(guard, count, duration, kill_every, stall, seed,
                            progress=progress)
