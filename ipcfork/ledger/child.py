"""The child's side of a ledger task: the key as an idempotency key, and each item's
outcome pickled where it was made.

The pool runs ``run_items(fn, keys, items, star)`` instead of ``fn(item)``: one item, or a
chunk of them, in any of the three modes (a module-level function, so it pickles by name
for persistent workers and the zygote).  For each item it sets the key that
:func:`task_key` returns, calls ``fn``, and pickles the result (or the exception) right
there, so that one item's failure fails only that item, a result that cannot be pickled
fails in the task with a clear message, and the parent stores the bytes as they came.
"""

from __future__ import annotations

import contextlib
import pickle
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ChildCrashedError, IpcforkError, RemoteTraceback
from .keys import TaskKey
from .store import DONE

__all__ = ["Outcome", "error_type_name", "run_items", "task_key"]

# ("done", pickled result, seconds) or
# ("failed", pickled exception or None, type name, message, traceback text, seconds)
Outcome = tuple[Any, ...]

_NO_KEY = object()
_current: list[Any] = [_NO_KEY]


def task_key() -> TaskKey:
    """The key of the ledger task running in this process: use it as an idempotency key
    (an e-mail's Message-ID, a payment's idempotency key), so that a task run again after
    a crash can tell the other side it is the same one.

    It is the item's index in the input, or what ``key(item)`` returned.  Raises
    IpcforkError when called outside a task run by ``map``/``imap_unordered`` with
    ``ledger=``.
    """
    key = _current[0]
    if key is _NO_KEY:
        raise IpcforkError("ipcfork.task_key() was called outside a ledger task: only a "
                           "task run by ForkPool.map or imap_unordered with ledger=... "
                           "has a key")
    return key  # type: ignore[no-any-return]


def error_type_name(error: BaseException) -> str:
    """``ValueError`` for builtins, ``module.Qualname`` for the rest."""
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def failure(error: BaseException, text: str | None, seconds: float | None) -> Outcome:
    """An item's failure as stored: the exception pickled if it pickles."""
    try:
        blob: bytes | None = pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # its type name and message are kept all the same
        blob = None
    return ("failed", blob, error_type_name(error), str(error), text, seconds)


def run_items(fn: Callable[..., Any], keys: Sequence[TaskKey], items: Sequence[Any],
              star: bool = False) -> list[Outcome]:
    """Run ``fn`` on each item (``fn(*item)`` with ``star``) with its key set; return each
    item's outcome (see ``Outcome``).  An Exception fails its item only; a BaseException
    (``sys.exit``) ends the task, as it would without a ledger."""
    outcomes: list[Outcome] = []
    try:
        for key, item in zip(keys, items, strict=True):
            _current[0] = key
            began = time.perf_counter()
            try:
                value = fn(*item) if star else fn(item)
            except Exception as exc:
                seconds = time.perf_counter() - began
                outcomes.append(failure(exc, traceback.format_exc(), seconds))
                continue
            seconds = time.perf_counter() - began
            try:
                blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                error = TypeError(f"the result of task {key!r} cannot be pickled for the "
                                  f"ledger: {type(exc).__name__}: {exc}")
                outcomes.append(failure(error, None, seconds))
                continue
            outcomes.append(("done", blob, seconds))
    finally:
        _current[0] = _NO_KEY
    return outcomes


def stored_error(key: TaskKey, blob: bytes | None, type_name: str, message: str,
                 text: str | None) -> BaseException:
    """The exception a failed task raised, rebuilt from the ledger (its traceback as
    ``__cause__``, as a plain run gives it)."""
    error: Any = None
    if blob is not None:
        with contextlib.suppress(Exception):
            error = pickle.loads(blob)
    if not isinstance(error, BaseException):
        error = ChildCrashedError(f"task {key!r} raised an exception that could not be "
                                  f"pickled: {type_name}: {message}")
    if text:
        error.__cause__ = RemoteTraceback(f'\n"""\n{text}"""')
    return error  # type: ignore[no-any-return]


def recorded_outcome(key: TaskKey, row: tuple[Any, ...]) -> tuple[bool, Any]:
    """A finished task's row from the ledger (``Store.outcome``) as ``(True, result)`` or
    ``(False, the exception it raised)``."""
    state, result, error, error_type, message, text = row
    if state == DONE:
        return True, pickle.loads(result)
    return False, stored_error(key, error, error_type, message, text)
