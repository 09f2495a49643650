"""ipcfork on a dask.distributed cluster (``pip install 'ipcfork[dask]'``).

``backend="dask"`` gives ``Mutex``, ``Semaphore``, ``SharedCounter`` and ``MessageQueue``
objects that meet their peers cluster-wide by name (``name=`` is required), with the
local classes' method names, timeouts and errors.  Each finds its client with
``distributed.get_client()`` (inside a task: the worker's) or takes ``client=``.
:func:`forked` runs a task in a fork of its worker, with ForkPool's guarantees.  Importing
``ipcfork`` never imports ``distributed``; the first dask object does.

Where the semantics differ from the local backends (``docs/dask.md`` says more):

- **Lease expiry instead of owner death.**  A dask Mutex or Semaphore is held through a
  lease that the holder's process refreshes; a holder that dies keeps it until the
  scheduler expires it (``distributed.scheduler.locks.lease-timeout``, 30 s by default,
  checked every ``lease-validation-interval``), and a live holder that cannot refresh in
  time loses it silently, so two holders may overlap.  ``previous_owner_died`` is always
  False, ``dead_owner_pid`` None, ``owner`` not knowable.
- **Semaphore units are leases**: only the handle that took one gives it back.
- **SharedCounter** is an Actor on one worker: every operation is linearizable and costs
  one round trip; if that worker dies the count is lost and every use raises
  ObjectCorruptError (never a silent reset to ``initial``) until ``unlink()``.
- **MessageQueue** messages wait in the scheduler's memory; ``max_messages`` defaults to
  unbounded; SysV message types do not exist.
- **Handles do not cross fork** (ObjectClosedError in the child) and pickle as their name:
  send them into tasks freely, each task gets its own handle.
- Named objects are created on first use: ``create``, ``exclusive``, ``allow_foreign`` and
  ``proj`` are accepted at their defaults only; ``created`` is not knowable (False)
  except for the counter.

Modules: ``client`` (finding the client, names, options), ``locks`` (Mutex, Semaphore),
``counter`` (SharedCounter), ``queue`` (MessageQueue), ``forked`` (the fork wrapper).
"""

from .counter import DaskCounter
from .forked import Forked, forked
from .locks import DaskMutex, DaskSemaphore
from .queue import DaskQueue

__all__ = ["DaskCounter", "DaskMutex", "DaskQueue", "DaskSemaphore", "Forked", "forked"]
