"""Resumable batches: ``ForkPool.map(fn, items, ledger="batch.sqlite")`` (and
``imap_unordered``) record every task in an SQLite ledger, so that the same call made
again after the parent died (SIGKILL, power loss, Ctrl-C) yields what was done and runs
only what is missing.

Parts: ``keys`` (task keys, item fingerprints, the function's name), ``store`` (the
database: schema, queries, grouped commits, the fork guard), ``runlock`` (one live run
per ledger), ``child`` (the task's side: ``task_key()``, outcomes pickled in the child),
``batch`` (the loop of a run), ``ledger`` (``ipcfork.Ledger``: read and reconcile),
``summary`` and ``command`` (``ipcfork ledger PATH``).

A task's life, as the ledger sees it::

    (no row) --dispatch--> started --outcome--> done | failed
                             |  (the run dies here: "uncertain")
                             +--> next run: uncertain="rerun": started again
                                            uncertain="hold": held, UncertainTasksError;
                                              Ledger.settle(key, ...) or .forget(key)

Guarantees:

- **A yielded result is committed.**  Outcomes are written, then committed, then
  yielded; a crash after the yield never loses it.
- **Started before dispatched.**  A task's ``started`` row is committed before the task
  is handed to the pool, so a task that may have run is never mistaken for one that did
  not.  Tasks the pool had not started when the iterator closed are cancelled (the start
  and the cancel race on one atomic token: exactly one wins) and their rows put back.
- **Recorded exactly once.**  One row per key (the table's primary key), and its outcome
  written once per execution; duplicate keys in one batch are refused.
- **At least once**, with ``uncertain="rerun"`` (the default): only the tasks in flight at
  the crash (at most the batch's in-flight window) run again.  **At most once** with
  ``uncertain="hold"``: they are reported for the user to reconcile, never run again.
- **One writer.**  Only the parent opens the database; children return pickled
  outcomes through the pool.  A second live run on the same ledger is refused
  (``LedgerBusyError`` naming its pid).
- **Same batch.**  A resumed run whose item under a key has another fingerprint, whose
  function has another qualified name, or whose keys are of another kind (index or
  ``key=``) is refused (``LedgerMismatchError``): results recorded for one batch are never
  yielded for another.

Durability: WAL with ``synchronous=NORMAL`` survives any death of the process; a power
loss may lose the last commits, whose tasks then run again (still at least once).
``Ledger(path, durable=True)`` commits with ``synchronous=FULL`` (an fsync per commit).
"""

from .child import task_key
from .ledger import Ledger
from .summary import Summary

__all__ = ["Ledger", "Summary", "task_key"]
