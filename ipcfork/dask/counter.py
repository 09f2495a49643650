"""``SharedCounter(initial, name, backend="dask")``: a dask Actor holding the count.

dask has no atomic add, and a Lock plus a Variable costs three scheduler round trips per
add and loses the count's consistency when a holder dies between them.  An Actor is one
object living on one worker; dask runs its methods one at a time (on the worker's single
actor thread), so each method is atomic and the counter is linearizable: every operation
is one round trip from the caller to the actor's worker.

The actor is a task with a fixed key (``ipcfork-counter-<name>``): every handle submits
that key, the scheduler runs it once and hands everyone the same actor, and each handle
publishes it as a dataset of the same name, so the counter lives until
:meth:`~DaskCounter.unlink`, like a named local counter.

**When the worker hosting the actor dies, the count is lost.**  The scheduler would
recompute the task on another worker and hand out a fresh counter at ``initial``;
ipcfork forbids that silent reset: the actor records its birth in the scheduler's
metadata, and a second birth raises ObjectCorruptError instead.  Every later use of the counter,
through old handles or new ones, raises ObjectCorruptError until someone calls
``unlink()`` (then the name makes a new counter).  Calls in flight when the worker died
may or may not have counted.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from .._counter_layout import _int64, _wrap
from ..counter import SharedCounter
from ..errors import ObjectCorruptError
from .client import (
    check_local_options,
    check_name,
    check_usable,
    cluster_key,
    require_distributed,
    resolve_client,
    wait_for_task,
)

__all__ = ["CounterActor", "DaskCounter"]


class CounterActor:
    """The count, on one worker.  Methods run one at a time: each is atomic."""

    def __init__(self, initial: int, birth: str, creator: str) -> None:
        distributed = require_distributed()
        client = distributed.get_client()
        before = client.get_metadata(birth, None)
        if before is not None:
            raise ObjectCorruptError(
                f"the worker that held dask SharedCounter {birth!r} died (it lived on "
                f"{before}); its count is lost: unlink() it to start again", obj=birth)
        client.set_metadata(birth, distributed.get_worker().address)
        self.total = initial
        self._creator = creator

    def creator(self) -> str:
        return self._creator

    def add(self, n: int) -> None:
        self.total = _wrap(self.total + n)

    def add_and_get(self, n: int) -> int:
        self.total = _wrap(self.total + n)
        return self.total

    def compare_and_set(self, expected: int, new: int) -> bool:
        if self.total != expected:
            return False
        self.total = new
        return True

    def value(self) -> int:
        return self.total


def _reopen_counter(name: str) -> DaskCounter:
    return DaskCounter(0, name)


class DaskCounter(SharedCounter):
    """A cluster-wide signed 64-bit counter (``SharedCounter(initial, name,
    backend="dask", client=None)``), linearizable in every operation.

    Each operation is one round trip to the worker hosting the counter's actor (the local
    counter's ``add`` is a few nanoseconds: batch adds where you can).  ``initial`` is used
    only when the counter is created.  Pickling sends the name only.  See the module
    docstring for what happens when the actor's worker dies (ObjectCorruptError, never a
    silent reset).
    """

    def __init__(self, initial: int = 0, name: str | None = None, *, backend: str = "dask",
                 client: Any = None, **options: Any) -> None:
        _int64(initial, "initial")
        check_local_options("SharedCounter", options)
        self.name = check_name("SharedCounter", name)
        self.backend = "dask"
        self._what = f"SharedCounter {self.name!r} (dask)"
        self._open = False
        self._client = resolve_client(client)
        self._pid = os.getpid()
        key = cluster_key("counter", self.name)
        self._key = key
        token = os.urandom(16).hex()  # the key is fixed: only the first submitter's runs
        future = self._client.submit(CounterActor, initial, f"{key}-born", token, key=key,
                                     actor=True)
        try:
            self._actor = wait_for_task(future)  # ObjectCorruptError after a loss (above)
        except ObjectCorruptError:
            raise
        except (OSError, RuntimeError) as exc:  # "Worker holding Actor was lost", ...
            raise ObjectCorruptError(
                f"{self._what}: its actor could not be reached ({exc}); if its worker was "
                "lost, the count is gone (unlink() to start again)", obj=self._what) from exc
        self._future = future
        # Published under its own key: the scheduler keeps it until unlink(); publishing
        # the same key again is harmless (override), so there is no race to lose.
        self._client.publish_dataset(future, name=key, override=True)
        self._open = True
        self.created = self._call("creator") == token

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _reopen_counter, (self.name,)

    def _call(self, method: str, *args: int) -> Any:
        check_usable(self._what, not self._open, self._pid)
        try:
            return getattr(self._actor, method)(*args).result()
        except ObjectCorruptError:
            raise
        except (OSError, RuntimeError) as exc:
            lost = self._future.status not in ("finished", "pending")
            if not lost:
                raise
            raise ObjectCorruptError(
                f"{self._what}: the worker hosting its actor was lost; the count is gone "
                f"(unlink() to start again)", obj=self._what) from exc

    def add(self, n: int = 1) -> None:
        """Add ``n`` (default 1); returns once the actor counted it.  Raises
        InvalidArgumentError if ``n`` is not an int in the int64 range, ObjectClosedError
        once closed, ObjectCorruptError if the counter was lost with its worker."""
        self._call("add", _int64(n, "n"))

    def add_and_get(self, n: int = 1) -> int:
        """Add ``n`` and return the new total, as one linearizable step."""
        return int(self._call("add_and_get", _int64(n, "n")))

    def compare_and_set(self, expected: int, new: int) -> bool:
        """Set the total to ``new`` if it is ``expected`` now, as one linearizable step."""
        return bool(self._call("compare_and_set", _int64(expected, "expected"),
                               _int64(new, "new")))

    @property
    def value(self) -> int:
        """The total now (linearizable, unlike the local counter's snapshot)."""
        return int(self._call("value"))

    def __repr__(self) -> str:
        return f"<{self._what}{' closed' if not self._open else ''}>"

    def close(self) -> None:
        """Drop this handle (the counter lives on until :meth:`unlink`); twice is
        harmless."""
        if not self._open:
            return
        self._open = False
        if os.getpid() == self._pid:
            self._future.release()

    def unlink(self) -> None:
        """Remove the counter's name from the cluster: its actor goes once no handle holds
        it any more, and from then on the name makes a new counter (after a loss too).
        Handles opened while older ones still hold the actor share the old count."""
        with contextlib.suppress(KeyError):
            self._client.unpublish_dataset(self._key)
        self._client.set_metadata(f"{self._key}-born", None)
