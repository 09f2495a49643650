"""Taking a lease of a dask ``Lock``/``Semaphore`` so that an interrupted wait leaves none
behind.

dask's own ``acquire`` sends one request that waits in the scheduler for the whole timeout
(for ever without one).  If the calling thread is interrupted meanwhile (Ctrl-C, any
exception raised by a signal handler), the client gives up but the scheduler's request goes
on, and may grant a lease that nobody holds: the lock then stays taken until the lease
expires (``lease-timeout``), for good if that is infinite.  So here:

- the wait is cut into requests of at most ``SLICE`` seconds, each with a lease id made here;
- when a request is interrupted, a release of its lease id is scheduled on the client's
  event loop for when that request must have ended (its slice plus a margin).  If the
  scheduler granted nothing, the release finds nothing (the scheduler logs a warning);
- a granted lease joins the dask object's own list, so dask refreshes and releases it as
  one of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from .._os.timeouts import Deadline
from ..errors import ObjectNotFoundError

__all__ = ["SLICE", "take_lease"]

SLICE = 1.0  # seconds one request may wait in the scheduler
_MARGIN = 2.0  # after the slice: time for the request's answer to arrive


async def _request(dask_semaphore: Any, timeout: float, lease_id: str) -> bool:
    await dask_semaphore  # registers the semaphore with the scheduler, as dask's acquire does
    return bool(await dask_semaphore.scheduler.semaphore_acquire(
        name=dask_semaphore.name, timeout=timeout, lease_id=lease_id))


def _release_when_settled(dask_semaphore: Any, lease_id: str, slice_seconds: float) -> None:
    async def release_later() -> None:
        await asyncio.sleep(slice_seconds + _MARGIN)
        with contextlib.suppress(Exception):  # the scheduler may be gone: nothing to free
            await dask_semaphore.scheduler.semaphore_release(name=dask_semaphore.name,
                                                             lease_id=lease_id)

    dask_semaphore.loop.add_callback(release_later)


def take_lease(dask_semaphore: Any, wait: float | None) -> bool:
    """Take one lease of ``dask_semaphore`` (a ``distributed.Semaphore`` or ``Lock``) within
    ``wait`` seconds (None: for ever, 0: only if free now); True if taken.  Raises what
    the wait raises (KeyboardInterrupt...), after arranging that a lease granted to the
    interrupted request is given back; ObjectNotFoundError once the semaphore was
    unlinked."""
    deadline = Deadline(wait)
    while True:
        remaining = deadline.remaining()
        left = SLICE if remaining is None else min(SLICE, remaining)
        lease_id = uuid.uuid4().hex
        try:
            granted = dask_semaphore.sync(_request, dask_semaphore, left, lease_id)
        except RuntimeError as exc:
            if "not known" not in str(exc):
                raise
            raise ObjectNotFoundError(f"{dask_semaphore.name} was unlinked",
                                      obj=dask_semaphore.name, backend="dask") from None
        except BaseException:
            _release_when_settled(dask_semaphore, lease_id, left)
            raise
        if granted:
            dask_semaphore._leases.append(lease_id)  # dask refreshes and releases its own
            return True
        if deadline.expired():
            return False
