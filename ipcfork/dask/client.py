"""Finding the dask client, and the checks every dask-backed object shares: the name, the
options that have no meaning on a cluster, and the scheduler-side key of each object."""

from __future__ import annotations

import importlib
import os
from typing import Any

from ..errors import InvalidArgumentError

__all__ = ["check_local_options", "check_name", "check_usable", "cluster_key",
           "require_distributed", "resolve_client", "scheduler_and_loop", "wait_for_task"]

PREFIX = "ipcfork"
MAX_NAME = 255
# Options of the local backends that a cluster object accepts only at their defaults: a
# dask object is created on first use, never exclusively, and has no owner or ftok key.
IN_FORKED_CHILD = False  # set in the children of ipcfork.dask.forked: no event loop there
_LOCAL_DEFAULTS: dict[str, Any] = {"create": True, "exclusive": False,
                                   "allow_foreign": False, "proj": "i"}


def require_distributed() -> Any:
    """The ``distributed`` module.  Raises ImportError telling how to install it."""
    try:
        return importlib.import_module("distributed")
    except ImportError as exc:
        raise ImportError("backend='dask' needs dask.distributed: pip install "
                          "'ipcfork[dask]' (or pip install distributed)") from exc


def resolve_client(client: Any = None) -> Any:
    """``client`` if given, else ``distributed.get_client()``: inside a task, the worker's
    client; outside, the current (most recent) client.

    Raises InvalidArgumentError when ``client`` is not a ``distributed.Client`` or when
    there is no client to find.
    """
    if IN_FORKED_CHILD:
        raise InvalidArgumentError(
            "dask objects cannot be used inside ipcfork.dask.forked(): the forked child has "
            "no dask event loop (use them in the task around it, or local primitives)")
    distributed = require_distributed()
    if client is not None:
        if not isinstance(client, distributed.Client):
            raise InvalidArgumentError(
                f"client must be a distributed.Client, not {type(client).__name__}")
        return client
    try:
        return distributed.get_client()
    except ValueError:
        raise InvalidArgumentError(
            "backend='dask' found no dask client: make one first "
            "(distributed.Client(address)) or pass client=") from None


def scheduler_and_loop(client: Any) -> tuple[Any, Any]:
    """What dask's Lock and Semaphore bind to: the scheduler's rpc and the event loop, the
    worker's own inside a task (as dask does), else the client's."""
    distributed = require_distributed()
    try:
        worker = distributed.get_worker()
    except ValueError:
        return client.scheduler, client.loop
    if worker.scheduler.address == client.scheduler.address:
        return worker.scheduler, worker.loop
    return client.scheduler, client.loop


def check_name(kind: str, name: object) -> str:
    """A cluster object's name: a non-empty str of at most 255 characters, no NUL.

    Raises InvalidArgumentError naming what a dask object needs.
    """
    if name is None:
        raise InvalidArgumentError(
            f"{kind}(backend='dask') needs name=: cluster objects have no fork family to "
            f"share an anonymous one, they meet their peers by name",
            limit="a name for backend='dask'")
    if not isinstance(name, str):
        raise InvalidArgumentError(f"a dask {kind} name must be a str, not {name!r}")
    if not name or len(name) > MAX_NAME or "\0" in name:
        raise InvalidArgumentError(
            f"a dask {kind} name must have 1..{MAX_NAME} characters and no NUL, not "
            f"{name!r}", limit=f"1..{MAX_NAME} characters")
    return name


def cluster_key(kind: str, name: str) -> str:
    """The scheduler-side name of ``kind`` called ``name`` (kinds never collide)."""
    return f"{PREFIX}-{kind}-{name}"


def check_local_options(kind: str, options: dict[str, Any]) -> None:
    """Refuse options of the local backends that mean nothing on a cluster (their default
    values pass, so code written for both backends runs unchanged)."""
    for option, value in options.items():
        if option not in _LOCAL_DEFAULTS:
            raise InvalidArgumentError(f"{kind}() got an unexpected option {option!r}")
        if value != _LOCAL_DEFAULTS[option]:
            raise InvalidArgumentError(
                f"{option}={value!r} does not apply to backend='dask': a cluster object "
                f"is created on first use by anyone who names it")


def wait_for_task(future: Any) -> Any:
    """``future.result()``, but inside a task the waiting thread first leaves the worker's
    thread pool (``secede``) and rejoins it after.  The awaited task (an actor's creation)
    needs a pool thread of its own: if every thread is a task waiting for it, none is left
    and the cluster deadlocks.  Raises what the task raised."""
    distributed = require_distributed()
    try:
        distributed.get_worker()
    except ValueError:  # not in a task: nothing to give back
        return future.result()
    distributed.secede()
    try:
        return future.result()
    finally:
        distributed.rejoin()


def check_usable(what: str, closed: bool, opened_by: int) -> None:
    """Raise ObjectClosedError when a dask handle is closed, or used in a process other
    than the one that opened it (a handle does not survive fork: the child has none of
    the client's event loop)."""
    from ..errors import ObjectClosedError

    if closed:
        raise ObjectClosedError(f"{what} is closed", obj=what)
    if os.getpid() != opened_by:
        raise ObjectClosedError(
            f"{what} was opened in process {opened_by}: a dask handle does not survive "
            "fork, open it again in the child", obj=what)
