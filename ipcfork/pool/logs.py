"""Forwarding children's log records to the parent's handlers ("do I/O in the parent").

Each pool owns one ``AF_UNIX``/``SOCK_DGRAM`` socket pair.  In a child, every logger's
handlers are removed and the root (and any logger that does not propagate) gets one that
sends each record, formatted into plain data, as a single
datagram (message boundaries kept, one send is atomic, so records of concurrent children
never interleave).  The parent's manager thread reads the socket whenever it has data, so a
child never waits on a full channel for long, and hands each record to the logger of the
same name in the parent, whose handlers and levels then apply.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
from typing import Any

__all__ = ["LogChannel"]

_MAX_DATAGRAM = 60_000  # longer messages and tracebacks are cut to keep datagrams small


class _ForwardingHandler(logging.Handler):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = dict(record.__dict__)
            data["msg"] = record.getMessage()[:_MAX_DATAGRAM]
            data["args"] = None
            if record.exc_info:
                text = logging.Formatter().formatException(record.exc_info)
                data["exc_text"] = text[-_MAX_DATAGRAM:]
            data["exc_info"] = None
            payload = pickle.dumps({k: v for k, v in data.items() if _plain(v)}, protocol=5)
            self._sock.send(payload)
        except Exception:
            self.handleError(record)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, tuple))


class LogChannel:
    """The socket pair of one pool."""

    def __init__(self) -> None:
        self._parent_end, self._child_end = socket.socketpair(socket.AF_UNIX,
                                                              socket.SOCK_DGRAM)
        self._parent_end.setblocking(False)

    @property
    def fds(self) -> tuple[int, int]:
        """Both ends (the pool's own: not an inherited connection to warn about)."""
        return self._parent_end.fileno(), self._child_end.fileno()

    @property
    def fd(self) -> int:
        """The descriptor the parent polls."""
        return self._parent_end.fileno()

    def install_in_child(self) -> None:
        """In a child: route every record to the parent instead of local handlers.

        Every logger's own handlers go (a named logger's file handler would otherwise
        write here and again in the parent).  The root forwards what propagates to it; a
        logger that stops propagation forwards its own records, so each record crosses
        once and the parent's loggers, with their handlers and propagation, take it from
        there."""
        self._parent_end.close()
        forward = _ForwardingHandler(self._child_end)
        root = logging.getLogger()
        named = [logger for logger in logging.Logger.manager.loggerDict.values()
                 if isinstance(logger, logging.Logger)]  # not the PlaceHolders
        for logger in [root, *named]:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            if logger is root or not logger.propagate:
                logger.addHandler(forward)
        logging.lastResort = None

    def drain(self) -> None:
        """In the parent: hand every waiting record to the parent's loggers."""
        while True:
            try:
                payload = self._parent_end.recv(1 << 18)
            except (BlockingIOError, OSError):
                return
            with contextlib.suppress(Exception):
                record = logging.makeLogRecord(pickle.loads(payload))
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)

    def close(self) -> None:
        self.drain()
        self._parent_end.close()
        self._child_end.close()
