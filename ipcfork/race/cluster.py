"""``ipcfork race --cluster ADDRESS``: the counter scenario across the workers of a dask
cluster (``local``: a ``LocalCluster`` of two worker processes made for the run).

The shared value is a dask ``Variable`` in the scheduler; each update reads it and writes
it back plus one.  Guards: ``none`` (the race), ``mutex-dask`` (a dask Mutex around each
read-modify-write: four scheduler round trips an update) and ``counter-dask`` (a dask
SharedCounter: one atomic add, one round trip to its actor).  Each of the ``--workers``
tasks runs in a task thread of the cluster, spread over its workers; they start together
at a dask ``Event``.  Needs ``ipcfork`` importable on the workers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from .guards import GUARDS, guard_spec
from .runner import RunResult

__all__ = ["CLUSTER_GUARDS", "DEFAULT_CLUSTER_ITERATIONS", "cluster_sweep", "open_cluster"]

CLUSTER_GUARDS = ("none", *(name for name, spec in GUARDS.items() if spec.cluster))
DEFAULT_CLUSTER_ITERATIONS = 200  # a few hundred scheduler round trips per worker
START_WAIT = 60.0


def _task(run: str, guard: str, index: int, iterations: int) -> tuple[float, float]:
    """One worker of a run (in a dask task): check in, wait for the start, update."""
    import ipcfork

    from ..dask.client import require_distributed

    distributed = require_distributed()
    client = distributed.get_client()
    cell = distributed.Variable(f"{run}-cell", client=client)
    distributed.Queue(f"{run}-ready", client=client).put(index)
    if not distributed.Event(f"{run}-start", client=client).wait(START_WAIT):
        raise ipcfork.WaitTimeoutError(f"worker {index} was not started in {START_WAIT} s")
    start = time.time()
    if guard == "counter-dask":
        counter = ipcfork.SharedCounter(name=f"{run}-counter", backend="dask")
        for _ in range(iterations):
            counter.add(1)
        counter.close()
    elif guard == "mutex-dask":
        mutex = ipcfork.Mutex(f"{run}-mutex", backend="dask")
        for _ in range(iterations):
            with mutex:
                cell.set(cell.get() + 1)
        mutex.close()
    else:
        for _ in range(iterations):
            cell.set(cell.get() + 1)
    return start, time.time()


@contextlib.contextmanager
def open_cluster(address: str, threads: int) -> Iterator[Any]:
    """A client of the cluster at ``address`` (``local``: a LocalCluster with two worker
    processes and enough threads for ``threads`` tasks at once).

    Raises ImportError without dask.distributed, OSError if the cluster cannot be reached
    or has fewer task threads than ``threads``.
    """
    from ..dask.client import require_distributed

    distributed = require_distributed()
    with contextlib.ExitStack() as stack:
        if address == "local":
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=2, threads_per_worker=max(1, -(-threads // 2)), processes=True,
                dashboard_address=None))
            address = cluster.scheduler_address
        try:
            client = stack.enter_context(distributed.Client(address, timeout="10s"))
        except (TimeoutError, OSError) as exc:
            raise OSError(f"cannot reach the dask scheduler at {address}: {exc}") from exc
        total = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        if total < threads:
            raise OSError(f"the cluster at {address} has {total} task threads; "
                          f"--workers {threads} needs as many")
        yield client


def _one(client: Any, guard: str, workers: int, iterations: int) -> RunResult:
    from ..dask.client import require_distributed
    from ..dask.counter import DaskCounter

    distributed = require_distributed()
    run = f"ipcfork-race-{os.getpid()}-{time.monotonic_ns()}"
    cell = distributed.Variable(f"{run}-cell", client=client)
    cell.set(0)
    counter = None
    if guard == "counter-dask":
        counter = DaskCounter(name=f"{run}-counter", client=client)
    addresses = list(client.scheduler_info()["workers"])
    ready = distributed.Queue(f"{run}-ready", client=client)
    tasks = [client.submit(_task, run, guard, i, iterations, pure=False,
                           workers=[addresses[i % len(addresses)]], allow_other_workers=True)
             for i in range(workers)]
    try:
        for _ in range(workers):
            ready.get(timeout=START_WAIT)
        distributed.Event(f"{run}-start", client=client).set()
        times = client.gather(tasks)
        observed = counter.value if counter is not None else int(cell.get())
    finally:
        client.cancel(tasks)
        ready.close()
        cell.delete()
        if counter is not None:
            counter.unlink()
            counter.close()
    expected = workers * iterations
    elapsed = max(end for _, end in times) - min(start for start, _ in times)
    guarded = guard_spec(guard).guarded
    return RunResult(
        scenario="counter", guard=guard, workers=workers, iterations=iterations, window=0.0,
        seed=0, expected=expected, observed=observed, updates=expected,
        lost=expected - observed, exact=observed == expected, guarded=guarded,
        failed=guarded and observed != expected, elapsed=elapsed,
        ops_per_s=expected / elapsed if elapsed > 0 else 0.0,
        note=f"dask cluster at {client.scheduler.address}")


def cluster_sweep(client: Any, guards: list[str], workers: list[int],
                  iterations: int) -> Iterator[RunResult]:
    """Run the counter scenario on the cluster for each worker count and guard."""
    for count in workers:
        for guard in guards:
            yield _one(client, guard, count, iterations)
