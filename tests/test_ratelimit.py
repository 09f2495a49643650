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
    stamps.close()
    limiter.close()


def test_non_blocking_and_timeout() -> None:
    limiter = RateLimiter(2, per=60)
    assert limiter.acquire(blocking=False) and limiter.acquire(blocking=False)
    assert not limiter.acquire(blocking=False)
    start = time.monotonic()
    assert not limiter.acquire(timeout=0.05)
    assert time.monotonic() - start < 10
    limiter.close()


@pytest.mark.parametrize(("rate", "per"), [(0, 1), (1.5, 1), (10, 0), (10, -1),
                                           (10, float("inf")), (2_000_000, 1)])
def test_bad_arguments(rate: object, per: object) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError):
        RateLimiter(rate, per)  # type: ignore[arg-type]
