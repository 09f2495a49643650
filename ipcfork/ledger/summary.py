"""What a ledger says about its batch: counts by state, failures by type, throughput.

``uncertain`` tasks were started and have no outcome while no run is live: their run died
(SIGKILL, power loss, Ctrl-C) while they were in flight.  While a run is live, such tasks
count as ``running`` instead.  ``pending`` tasks were never started: the batch's size (as
the last run learned it) minus the tasks recorded; unknown (None) until a run has seen the
whole input.

Throughput is over the recorded timings: the tasks that finished, divided by the time the
runs spent on them (for each run, from its first task's start to its last task's end;
time between runs does not count).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .runlock import holder
from .store import DONE, FAILED, STARTED, Store

__all__ = ["Summary", "summarise"]


@dataclass
class Summary:
    """A ledger's state (see the module docstring); ``asdict()`` gives the JSON form."""

    path: str
    function: str | None
    keys: str | None
    total: int | None
    done: int
    failed: int
    uncertain: int
    running: int
    pending: int | None
    attempts: int
    runs: int
    live_pid: int | None
    finished: int
    busy_seconds: float
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float | None:
        """Finished tasks per second of run time, or None before any finished."""
        if not self.finished or self.busy_seconds <= 0:
            return None
        return self.finished / self.busy_seconds

    def as_json(self) -> dict[str, Any]:
        """The summary as the JSON of ``ipcfork ledger --json``."""
        data = asdict(self)
        counts = {name: data.pop(name) for name in
                  ("done", "failed", "uncertain", "running", "pending")}
        rate = self.throughput
        return {
            "path": data["path"], "function": data["function"], "keys": data["keys"],
            "total": data["total"], "counts": counts, "failures": data["failures"],
            "attempts": data["attempts"], "runs": data["runs"], "live_pid": data["live_pid"],
            "throughput": {"tasks": self.finished, "seconds": round(self.busy_seconds, 6),
                           "per_second": None if rate is None else round(rate, 3)},
        }


def summarise(store: Store) -> Summary:
    """Read ``store``'s summary; takes no lock and writes nothing."""
    live = holder(store.path)
    meta = store.meta()
    counts = dict(store.query("SELECT state, count(*) FROM tasks GROUP BY state"))
    started = counts.get(STARTED, 0)
    runs = store.query("SELECT count(*), (SELECT total FROM runs WHERE total IS NOT NULL "
                       "ORDER BY id DESC LIMIT 1) FROM runs")
    run_count, total = runs[0]
    recorded = sum(counts.values())
    failures = dict(store.query(
        "SELECT error_type, count(*) FROM tasks WHERE state = ? GROUP BY error_type "
        "ORDER BY count(*) DESC, error_type", (FAILED,)))
    busy = store.query(
        "SELECT count(*), max(finished) - min(started) FROM tasks "
        "WHERE state IN (?, ?) AND finished IS NOT NULL GROUP BY run", (DONE, FAILED))
    attempts = store.query("SELECT coalesce(sum(attempts), 0) FROM tasks")[0][0]
    return Summary(
        path=store.path, function=meta.get("function"), keys=meta.get("keys"), total=total,
        done=counts.get(DONE, 0), failed=counts.get(FAILED, 0),
        uncertain=0 if live is not None else started,
        running=started if live is not None else 0,
        pending=None if total is None else max(0, total - recorded),
        attempts=int(attempts), runs=int(run_count), live_pid=live,
        finished=sum(n for n, _ in busy), busy_seconds=sum(max(0.0, s or 0.0) for _, s in busy),
        failures=failures)
