"""ipcfork's native core: a robust process-shared mutex and 64-bit atomics on shared memory.

The compiled extension ``_core`` (built at install by setuptools from ``_core.c``) is used
when it was built; otherwise, or with ``IPCFORK_PURE=1`` in the environment, the ctypes
fallback (``fallback.py``: the same glibc calls on the same memory layout, slower).  A
process on either path shares a mutex correctly with a process on the other.

:data:`PATH` says which one is in use ("compiled" or "ctypes") and :data:`WHY` why.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..identity import IDENTITY
from . import fallback

__all__ = ["BLOCK_SIZE", "INIT_WAIT", "PATH", "WHY", "AtomicWords", "CounterCore", "RobustMutex",
           "SysvLockCore", "bind_block"]

_compiled: Any
try:
    from . import _core as _compiled  # type: ignore[attr-defined, no-redef]
except ImportError:  # installed without a compiler
    _compiled = None

_impl: Any
if os.environ.get("IPCFORK_PURE", "") not in ("", "0"):
    _impl = fallback
    PATH, WHY = "ctypes", "IPCFORK_PURE is set"
elif _compiled is None:
    _impl = fallback
    PATH, WHY = "ctypes", "the C extension is not built: no C compiler at install?"
else:
    _impl = _compiled
    PATH, WHY = "compiled", "the C extension ipcfork._os.native._core"

RobustMutex: Any = _impl.RobustMutex
AtomicWords: Any = _impl.AtomicWords
CounterCore: Any = _impl.CounterCore
SysvLockCore: Any = _impl.SysvLockCore
BLOCK_SIZE: int = _impl.BLOCK_SIZE
INIT_WAIT = 2.0  # seconds an opener waits for a creator to initialise a mutex block
# Spinning pays only where the holder can run meanwhile on another core.
SPINS = 100 if (os.cpu_count() or 1) > 1 else 0


def _sync_identity() -> None:
    # Registered after _identity's own at-fork hook (imported above), so it runs after it.
    # Both paths learn it: a process may use one path's types beside the other's.
    for module in (_compiled, fallback):
        if module is not None:
            module.set_identity(IDENTITY.token, IDENTITY.pid)


_sync_identity()
_impl.set_spin(SPINS)
os.register_at_fork(after_in_child=_sync_identity)


def bind_block(mutex: Any, buffer: Any, offset: int, create: bool, what: str) -> None:
    """Bind ``mutex`` to the block at ``offset``: initialise it (``create``), or wait, at
    most :data:`INIT_WAIT` seconds, for its creator to have done so.

    Raises ObjectCorruptError if the block holds something else or stays uninitialised.
    """
    deadline = time.monotonic() + INIT_WAIT
    while not mutex._bind(buffer, offset, create, what):
        if time.monotonic() >= deadline:
            from ...errors import ObjectCorruptError

            raise ObjectCorruptError(
                f"{what} was never initialised: its creator did not finish within "
                f"{INIT_WAIT} s (it may have died while creating it)",
                obj=what, backend="posix", limit=f"{INIT_WAIT} s")
        time.sleep(0.001)  # another process's progress: there is nothing to block on
