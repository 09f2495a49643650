"""RateLimiter: never more than ``rate`` turns in any window of ``per`` seconds."""

from __future__ import annotations

import time

import pytest
from conftest import fork, reap

import ipcfork
from ipcfork import RateLimiter, SharedArray


def test_processes_together_stay_under_the_limit() -> None:
    rate, per, each, procs = 10, 0.2, 8, 4
    limiter = RateLimiter(rate, per)
    stamps = SharedArray("d", each * procs)

    def worker(k: int) -> None:
        for i in range(each):
            with limiter:
                stamps[k * each + i] = time.monotonic()

    pids = [fork(worker, k) for k in range(procs)]
    assert [reap(pid) for pid in pids] == [0] * procs
    times = sorted(stamps.tolist())
    assert limiter.taken == each * procs
    # Recording happens just after admission, so give each stamp 10 % of a window of slack.
    window = per * 0.9
    for i, start in enumerate(times):
        inside = sum(1 for t in times[i:] if t - start < window)
        assert inside <= rate
    assert not limiter.lock.locked()  # every turn gave the lock back
    stamps.close()
    limiter.close()


def test_non_blocking_and_timeout() -> None:
    limiter = RateLimiter(2, per=60)
    assert limiter.acquire(blocking=False) and limiter.acquire(blocking=False)
    assert not limiter.acquire(blocking=False)
    start = time.monotonic()
    assert not limiter.acquire(timeout=0.05)
    elapsed = time.monotonic() - start
    assert elapsed >= 0.05 * 0.9  # it waited: a False returned at once is not a timeout
    assert elapsed < 10
    assert limiter.taken == 2 and not limiter.lock.locked()
    limiter.close()


@pytest.mark.parametrize(("rate", "per"), [(0, 1), (1.5, 1), (10, 0), (10, -1),
                                           (10, float("inf")), (2_000_000, 1)])
def test_bad_arguments(rate: object, per: object) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError):
        RateLimiter(rate, per)  # type: ignore[arg-type]


def test_named_limiter_refuses_other_parameters(backend: str, name: str) -> None:
    """A named limiter keeps its ``rate`` and ``per`` in its segment: opening it (in this or
    another process) with the same ones shares its turns; with another ``rate`` or ``per``
    it is refused with InvalidArgumentError naming the stored and the requested values,
    instead of silently using a window of the wrong size."""
    limiter = RateLimiter(3, 1.5, name, backend=backend)
    try:
        assert limiter.acquire(blocking=False)
        for rate, per in ((5, 1.5), (2, 1.5), (3, 1.0), (3, 60)):
            with pytest.raises(ipcfork.InvalidArgumentError) as refused:
                RateLimiter(rate, per, name, backend=backend, create=False)
            message = str(refused.value)
            assert "rate=3" in message and "per=1.5" in message
            assert f"rate={rate}" in message and f"per={float(per)}" in message
            assert refused.value.limit is not None
            assert refused.value.backend == backend

        def same_parameters() -> int:
            other = RateLimiter(3, 1.5, name, backend=backend, create=False)
            took = other.acquire(blocking=False)
            other.close()
            return 0 if took else 1

        assert reap(fork(same_parameters)) == 0
        assert limiter.taken == 2
        assert limiter.acquire(blocking=False)
        assert not limiter.acquire(blocking=False)  # 3 turns in this window, from 2 processes
    finally:
        limiter.unlink()
        limiter.close()
