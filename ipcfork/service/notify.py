"""systemd's notify protocol (``sd_notify(3)``), spoken directly: one datagram of
``KEY=VALUE`` lines to the unix socket named by ``$NOTIFY_SOCKET``.

Without ``NOTIFY_SOCKET`` every call is a no-op, so a service runs the same under systemd
(``Type=notify``), under another supervisor or in a terminal.  A name starting with ``@`` is
an abstract socket.  ``WATCHDOG_USEC`` asks for ``WATCHDOG=1`` at least that often; we send it
at half the interval, as ``sd_watchdog_enabled(3)`` advises, and only when ``WATCHDOG_PID``
(if set) is this process.  Workers remove ``NOTIFY_SOCKET`` from their environment, so code
they run cannot speak for the service by accident.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "monotonic_usec"]

_log = logging.getLogger("ipcfork.service")


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as ``RELOADING=1`` wants it in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notify messages for this process (see the module docstring)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        self._socket: socket.socket | None = None
        self._failed = False
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2e6

    def send(self, *lines: str) -> None:
        """Send ``lines`` as one datagram, without blocking.  A failure (no listener, a full
        queue) is logged once and never raised: a listener that stopped reading must not
        take the service down with it."""
        if self._socket is None or self._address is None:
            return
        try:
            # Never wait: a supervisor blocked on a listener that stopped reading would stop
            # supervising.  A full queue drops this message (and says so, once).
            self._socket.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                _log.warning("cannot notify %s: %s", self._address.replace("\0", "@"), exc)

    def close(self) -> None:
        """Close the socket.  Harmless twice."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
