"""The public face of the service mode: :class:`Service` checks its options, resolves the
function the workers run, and hands over to the supervisor loop (``supervisor.py``)."""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from ..errors import InvalidArgumentError
from .pidfile import Pidfile
from .status import MAX_WORKERS
from .worker import WorkerContext

__all__ = ["Service"]

Work = Callable[[WorkerContext], Any]


def _check_seconds(value: object, what: str, *, allow_none: bool = False,
                   allow_zero: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or value < 0 or (value == 0 and not allow_zero) or math.isinf(value):
        bound = ">= 0" if allow_zero else "> 0"
        extra = " or None" if allow_none else ""
        raise InvalidArgumentError(f"{what} must be a finite number of seconds {bound}{extra}, "
                                   f"not {value!r}", limit=f"{what} {bound}")
    return float(value)


def _check_count(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"{what} must be an int from {low} to {high}, not {value!r}",
                                   limit=f"{low} <= {what} <= {high}")
    return value


def _load(target: str, *, fresh: bool) -> Work:
    """``"package.module:function"`` to the function; ``fresh`` re-imports the module so that
    a reload runs the code as it is on disk now.  Raises InvalidArgumentError when the
    module cannot be imported or has no such callable (other errors of the import pass)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise InvalidArgumentError(f"{target!r} is not MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
        if fresh:
            module = importlib.reload(module)
        found: Any = module
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError(f"cannot load {target}: {type(exc).__name__}: {exc}") \
            from exc
    if not callable(found):
        raise InvalidArgumentError(f"{target} is not callable")
    return found  # type: ignore[no-any-return]


class Service:
    """A supervised pre-fork service: ``workers`` forked processes each run
    ``work(ctx)`` (``ctx`` is a :class:`WorkerContext`), kept alive and replaced by a
    supervisor that :meth:`run` turns this process into.

    ``work`` is a callable or ``"module:function"``; with the string, each reload (SIGHUP)
    imports the module again, so new code takes effect; a reload whose import fails is
    logged and the running generation kept.  ``heartbeat_timeout``: seconds a worker may
    go without ``ctx.heartbeat()`` before it is terminated and replaced (None: never).
    ``drain_timeout``: seconds a stopping worker may take to finish its unit before it is
    killed.  ``pidfile``: a path locked for the service's lifetime (see ``pidfile.py``).
    ``name``: shown in logs and ``ipcfork status`` (default: the function's name).
    ``max_restarts`` unrequested worker exits within ``restart_window`` seconds are
    tolerated; one more stops the service with :class:`~ipcfork.CrashLoopError`.

    Raises InvalidArgumentError for a bad option (the message names it and its limit) and
    when ``work`` cannot be resolved.  Signals, supervision and the notify protocol are
    described in ``docs/service.md``.
    """

    def __init__(self, work: Work | str, workers: int = 4, *,
                 heartbeat_timeout: float | None = 30.0, drain_timeout: float = 30.0,
                 pidfile: str | os.PathLike[str] | None = None, name: str | None = None,
                 max_restarts: int = 10, restart_window: float = 60.0,
                 allow_foreign_pidfile: bool = False) -> None:
        self.target = work if isinstance(work, str) else None
        if isinstance(work, str):
            self.work = _load(work, fresh=False)
        elif callable(work):
            self.work = work
        else:
            raise InvalidArgumentError(f"work must be a callable or 'module:function', "
                                       f"not {work!r}")
        self.workers = _check_count(workers, "workers", 1, MAX_WORKERS)
        self.heartbeat_timeout = _check_seconds(heartbeat_timeout, "heartbeat_timeout",
                                                allow_none=True)
        self.drain_timeout = _check_seconds(drain_timeout, "drain_timeout", allow_zero=True)
        self.max_restarts = _check_count(max_restarts, "max_restarts", 1, 1_000_000)
        self.restart_window = _check_seconds(restart_window, "restart_window")
        if pidfile is not None and not isinstance(pidfile, (str, os.PathLike)):
            raise InvalidArgumentError(f"pidfile must be a path or None, not {pidfile!r}")
        if pidfile is not None:
            Pidfile(pidfile)  # its checks, now rather than at run()
        self.pidfile = pidfile
        self.allow_foreign_pidfile = allow_foreign_pidfile
        if name is None:  # the function's own name, cut to what the status table holds
            default = self.target or getattr(self.work, "__name__", type(self.work).__name__)
            name = str(default).encode()[:64].decode(errors="ignore")
        if not isinstance(name, str) or not name or len(name.encode()) > 64:
            raise InvalidArgumentError(f"name must be a non-empty str of at most 64 bytes, "
                                       f"not {name!r}", limit="len(name.encode()) <= 64")
        self.name = name

    def __repr__(self) -> str:
        return f"<Service {self.name!r} workers={self.workers}>"

    def reloaded_work(self) -> Work:
        """The function for a new generation: imported afresh when ``work`` was given as
        ``"module:function"``, else the same callable.  Raises what the import raises."""
        if self.target is None:
            return self.work
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        self.work = _load(self.target, fresh=True)
        return self.work

    def run(self) -> None:
        """Become the supervisor: start the workers and supervise them until a stop signal.

        Returns after a graceful (SIGTERM) or fast (SIGINT, SIGQUIT) stop, once every worker
        and every process they started has ended.  Raises ServiceRunningError if the pidfile
        is held by a live service, CrashLoopError when workers keep dying, RuntimeError
        off the main thread (signal handlers need it).  This process reaps every child it
        has while it runs: call it from a process that is only a service.
        """
        from .supervisor import Supervisor

        Supervisor(self).run()
