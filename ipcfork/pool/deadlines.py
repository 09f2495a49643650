"""Timeouts, one path for every mode: a process whose running task passed its deadline
gets SIGTERM, then one SIGKILL ``grace`` seconds later, and after that nothing but waiting
for its exit (a child in uninterruptible sleep, or a stopped zygote that cannot deliver
the KILL, must not turn the manager's loop into a busy one)."""

from __future__ import annotations

import signal

from .dispatcher import Dispatcher, Process

__all__ = ["enforce", "next_deadline", "terminate"]


def terminate(dispatcher: Dispatcher, process: Process, now: float) -> None:
    """SIGTERM ``process`` now; its grace period starts."""
    process.terminated_at = now
    dispatcher.signal(process, signal.SIGTERM)


def enforce(dispatcher: Dispatcher, grace: float, now: float) -> None:
    """TERM what is overdue, KILL (once) what outlived its grace period."""
    for process in dispatcher.processes():
        if process.terminated_at is None:
            run = process.running_task()
            if run is not None and run.deadline is not None and now >= run.deadline:
                run.timed_out = True
                terminate(dispatcher, process, now)
        elif not process.kill_sent and now >= process.terminated_at + grace:
            process.kill_sent = True  # once: then we only wait for the exit
            dispatcher.signal(process, signal.SIGKILL)


def next_deadline(dispatcher: Dispatcher, grace: float, now: float) -> float | None:
    """Seconds until the next deadline or end of a grace period, or None if none."""
    waits = []
    for process in dispatcher.processes():
        if process.terminated_at is not None:
            if not process.kill_sent:
                waits.append(process.terminated_at + grace - now)
            continue
        run = process.running_task()
        if run is not None and run.deadline is not None:
            waits.append(run.deadline - now)
    return max(0.0, min(waits)) if waits else None
