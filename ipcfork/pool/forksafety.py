"""ForkPool's fork-safety checks: three of the seed's rules as ForkSafetyWarning.

- "DON'T fork a web process": at pool creation, :func:`web_server` says whether this
  process serves web requests (a gunicorn or uWSGI worker, mod_wsgi, uvicorn, ...).
- "DON'T open resources before forking": before a fork, :func:`inherited_connections`
  lists the connections every child would inherit (connected sockets, open SQLite
  databases), read from ``/proc/self/fd``.
- Forking while other threads run (a child needing a lock one of them held deadlocks).

A pool owns one :class:`ForkSafety`; each kind warns at most once per pool, and the pool's
``fork_safety_checks=False`` silences all of them.  The warnings filters silence them too:
category ForkSafetyWarning, and each kind's message has its own fixed start ("ForkPool
created inside", "ForkPool forks while this process holds", "ForkPool forks while other
threads run").

Cost: the web check and the thread check are a few microseconds.  The descriptor scan is
one ``fstat`` per open descriptor plus a few calls per socket; it runs at a pool's first
fork, then at most once per :data:`RESCAN_INTERVAL` seconds (at the first fork after it
is due) until it has warned, so a pool forking a thousand children a second pays for one
scan a second, not a thousand.
"""

from __future__ import annotations

import importlib
import os
import socket
import stat
import sys
import threading
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from types import FrameType, ModuleType

from ..errors import ForkSafetyWarning

__all__ = ["EXEMPT_FILES", "RESCAN_INTERVAL", "Connection", "ForkSafety",
           "inherited_connections", "web_server"]

# Seconds between two descriptor scans of one pool.  Why not "rescan when the fd table
# changed": nothing tells that cheaply.  A count (st_size of /proc/self/fd on Linux 6.2+)
# is a procfs lookup per fork, and misses a file closed and a connection opened between
# two forks; comparing the tables needs the scan itself.  A connection opened before the
# pool (the rule's case) is named at the first fork; one opened later, within a second.
RESCAN_INTERVAL = 1.0

# Files ipcfork itself keeps open across forks on purpose, as (st_dev, st_ino): a resumable
# batch's ledger, which only the parent ever uses (``ipcfork.ledger``), so not reported.
EXEMPT_FILES: set[tuple[int, int]] = set()

_SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database
_SQLITE_MIN_SIZE = 512  # the smallest page: a database with its header has one
_MAX_NAMED = 10  # connections named in one message; the rest are counted

_PORTS = {5432: "PostgreSQL", 3306: "MySQL", 6379: "Redis", 27017: "MongoDB",
          11211: "memcached"}
# Socket file names the servers use by default (PostgreSQL's holds its port).
_UNIX_NAMES = ((".s.PGSQL.", "PostgreSQL"), ("mysqld.sock", "MySQL"),
               ("mysql.sock", "MySQL"), ("redis.sock", "Redis"),
               ("memcached.sock", "memcached"), ("mongodb-", "MongoDB"))
_PROTOCOLS = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP"}

# A frame of one of these modules on the stack means "this process serves web requests".
# Only the main thread's and the calling thread's stacks count: a test that runs a server
# in a background thread is not a web process (the thread check names that thread).
_SERVING_MODULES = {
    "gunicorn.workers": "a gunicorn worker",
    "uvicorn.server": "uvicorn",
    "uvicorn.protocols": "uvicorn",
    "uvicorn.lifespan": "uvicorn",
    "hypercorn.asyncio": "hypercorn",
    "hypercorn.trio": "hypercorn",
    "hypercorn.protocol": "hypercorn",
    "daphne": "daphne",
    "waitress": "waitress",
    "cheroot": "cheroot (CherryPy's server)",
    "werkzeug.serving": "the werkzeug development server",
    "django.core.servers.basehttp": "Django's runserver",
    "wsgiref.simple_server": "wsgiref's simple_server",
}


@dataclass(frozen=True)
class Connection:
    """One connection a child would inherit: ``fd 7 TCP 127.0.0.1:5432 (PostgreSQL)``."""

    fd: int
    kind: str  # "TCP", "UDP", "UNIX" or "SQLite"
    peer: str  # host:port, a socket path, or the database's path
    service: str | None = None  # the server a well-known port or socket name suggests

    def __str__(self) -> str:
        named = f" ({self.service})" if self.service else ""
        return f"fd {self.fd} {self.kind} {self.peer}{named}"


def inherited_connections(exclude: Collection[int] = ()) -> list[Connection]:
    """The connections open in this process that a forked child would inherit, by fd.

    Reported: connected TCP and UDP sockets (either end), AF_UNIX stream sockets
    connected to or accepted on a named socket, and SQLite databases (a regular file
    starting with SQLite's header).  Not reported: fds 0-2 and those in ``exclude``,
    listening sockets (preforking servers share them by design), unconnected sockets,
    unnamed AF_UNIX pairs (``socketpair``), AF_UNIX datagram sockets (the system log),
    and a database file still empty (no header yet).  Never raises: a descriptor closed
    meanwhile, or a process without /proc, yields fewer entries.
    """
    skip = set(exclude)
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # no /proc here (a chroot, a sandbox): nothing can be seen
        return []
    found = []
    for name in names:
        fd = int(name)
        if fd <= 2 or fd in skip:  # the standard streams are inherited by design
            continue
        try:
            info = os.fstat(fd)
        except OSError:  # closed since the listing (the listing's own fd is one)
            continue
        if stat.S_ISSOCK(info.st_mode):
            connection = _socket_connection(fd)
        elif stat.S_ISREG(info.st_mode):
            connection = _sqlite_database(fd, info)
        else:
            continue
        if connection is not None:
            found.append(connection)
    return sorted(found, key=lambda c: c.fd)


def _socket_connection(fd: int) -> Connection | None:
    # A duplicate, so that nothing done here can close or change the owner's descriptor.
    try:
        dup = os.dup(fd)
    except OSError:  # closed meanwhile, or no descriptor left: nothing to report
        return None
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    with sock:
        try:
            peer = sock.getpeername()
            own = sock.getsockname()
        except OSError:  # ENOTCONN: listening, unconnected or still connecting
            return None
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = f"[{peer[0]}]" if sock.family == socket.AF_INET6 else peer[0]
            kind = _PROTOCOLS.get(sock.proto, sock.type.name)
            return Connection(fd, kind, f"{host}:{peer[1]}", _PORTS.get(peer[1]))
        if sock.family == socket.AF_UNIX:
            return _unix_connection(fd, sock.type, peer, own)
    return None  # netlink, packet and other families are no server connection


def _unix_connection(fd: int, kind: socket.SocketKind, peer: str | bytes,
                     own: str | bytes) -> Connection | None:
    # A client's peer is the server's path; an accepted socket's own name is (its peer,
    # the client, is unnamed).  Abstract names come as bytes starting with NUL.
    if kind == socket.SOCK_DGRAM:
        # One-way records, each delivered whole: the system log (SysLogHandler to
        # /dev/log, journald), which children are meant to share.
        return None
    named, accepted = (peer, False) if peer else (own, True)
    if not named:
        return None  # both ends unnamed: a socketpair, shared with children on purpose
    path = named if isinstance(named, str) else "@" + named[1:].decode(errors="replace")
    service = next((server for part, server in _UNIX_NAMES
                    if part in os.path.basename(path)), None)
    return Connection(fd, "UNIX", f"accepted on {path}" if accepted else path, service)


def _sqlite_database(fd: int, info: os.stat_result) -> Connection | None:
    # SQLite: a database connection must not be carried across a fork (the child's
    # locks and cache lie about the file, and writes from both sides corrupt it).  The
    # size test also skips /proc files (size 0), whose reads may block.
    if info.st_size < _SQLITE_MIN_SIZE or (info.st_dev, info.st_ino) in EXEMPT_FILES:
        return None
    try:
        if os.pread(fd, len(_SQLITE_HEADER), 0) != _SQLITE_HEADER:
            return None
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # write-only, O_PATH or O_DIRECT descriptors; or closed meanwhile
        return None
    return Connection(fd, "SQLite", path)


def web_server() -> str | None:
    """What serves web requests in this process, for a message ("a gunicorn worker",
    "uWSGI worker 2", "uvicorn", ...); None in a process that serves none (a script, a
    test run, a task queue's worker).

    Seen: uWSGI and mod_wsgi by the module they embed in the interpreter, the Python
    servers by a frame of their serving code on the main thread's or this thread's
    stack (a worker's loop, or the request being handled).  Never raises.
    """
    return _embedded_server() or _serving_frames()


def _embedded_server() -> str | None:
    # uWSGI builds its "uwsgi" module into the interpreter (no file: a stub package from
    # an index has one); mod_wsgi adds process_group to "mod_wsgi" inside Apache only.
    uwsgi: ModuleType | None = sys.modules.get("uwsgi")
    if uwsgi is None and "uwsgi" in sys.builtin_module_names:
        uwsgi = importlib.import_module("uwsgi")
    if uwsgi is not None and getattr(uwsgi, "__file__", None) is None and hasattr(
            uwsgi, "worker_id"):
        try:
            worker = int(uwsgi.worker_id())
        except Exception:  # an API changed: the process is uWSGI's all the same
            return "uWSGI"
        return f"uWSGI worker {worker}" if worker else "uWSGI's master process"
    group = getattr(sys.modules.get("mod_wsgi"), "process_group", None)
    if isinstance(group, str):
        return (f"mod_wsgi's daemon process group {group!r}" if group
                else "an Apache child process (mod_wsgi, embedded mode)")
    return None


def _serving_frames() -> str | None:
    if not any(name in sys.modules for name in _SERVING_MODULES):
        return None  # the common case: none of the servers is even imported
    main = sys._current_frames().get(threading.main_thread().ident or 0)
    for top in (sys._getframe(), main):
        found = None
        frame: FrameType | None = top
        while frame is not None:
            # The outermost frame wins: gunicorn's worker running uvicorn's is gunicorn's.
            found = _server_of(frame) or found
            frame = frame.f_back
        if found is not None:
            return found
    return None


def _server_of(frame: FrameType) -> str | None:
    module = frame.f_globals.get("__name__")
    while isinstance(module, str) and module:
        if module in _SERVING_MODULES:
            return _SERVING_MODULES[module]
        module = module.rpartition(".")[0]
    return None


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by our caller name the first frame
    outside ipcfork (the user's ``ForkPool(...)`` call, or a subclass's ``__init__``)."""
    level = 1
    frame = sys._getframe(1)
    while frame.f_back is not None and _in_ipcfork(frame):
        frame = frame.f_back
        level += 1
    return level


def _in_ipcfork(frame: FrameType) -> bool:
    module = str(frame.f_globals.get("__name__", ""))
    return module == "ipcfork" or module.startswith("ipcfork.")


class ForkSafety:
    """The fork-safety checks of one pool, each warning (ForkSafetyWarning) at most once.

    ``enabled=False`` turns all of them off.  ``rescan_interval``: seconds before the
    descriptors are scanned again after a scan that found nothing (see the module's
    docstring for the cost).  Each method raises ForkSafetyWarning only where a warnings
    filter turns it into an error (the "error" action); the kind counts as warned then
    too, so that happens at most once per kind as well.
    """

    def __init__(self, enabled: bool = True, *,
                 rescan_interval: float = RESCAN_INTERVAL) -> None:
        self.enabled = enabled
        self.rescan_interval = rescan_interval
        self._warned_web = False
        self._warned_threads = False
        self._warned_connections = False
        self._next_scan: float | None = None  # None: at the next fork (the first)

    def at_pool_creation(self) -> None:
        """Warn if this process serves web requests (see :func:`web_server`); call it in
        ``ForkPool.__init__``: the warning names the user's ``ForkPool(...)`` line."""
        if not self.enabled or self._warned_web:
            return
        server = web_server()
        if server is None:
            return
        self._warned_web = True
        warnings.warn(
            f"ForkPool created inside {server} (pid {os.getpid()}): every child gets a "
            "copy of the server's sockets, threads and memory, and holds up the requests "
            "this process serves; do the work outside the web process (a job queue or a "
            "separate service), or pass fork_safety_checks=False",
            ForkSafetyWarning, stacklevel=_user_stacklevel())

    def before_fork(self, own_fds: Collection[int] = (),
                    idle_threads: Collection[threading.Thread] = ()) -> None:
        """Warn if other threads run, or if this process holds connections a child would
        inherit; call it just before each fork, with the descriptors the pool itself
        opened (they are not reported) and the threads known to hold no lock now (the
        one waiting in the pool's constructor while its manager forks the zygote).  The
        warnings name the pool's call site: they are raised in its manager thread, where
        no user code is on the stack."""
        if not self.enabled:
            return
        self._check_threads(idle_threads)
        self._check_connections(own_fds)

    def _check_threads(self, idle: Collection[threading.Thread] = ()) -> None:
        if self._warned_threads:
            return
        others = [t for t in threading.enumerate()
                  if t is not threading.current_thread() and t is not threading.main_thread()
                  and not t.name.startswith("ipcfork-") and t not in idle]
        if others:
            self._warned_threads = True
            names = ", ".join(t.name for t in others[:5])
            warnings.warn(
                f"ForkPool forks while other threads run ({names}); a child that needs a "
                "lock one of them held at fork time will deadlock", ForkSafetyWarning,
                stacklevel=3)

    def _check_connections(self, own_fds: Collection[int]) -> None:
        if self._warned_connections:
            return
        now = time.monotonic()
        if self._next_scan is not None and now < self._next_scan:
            return
        self._next_scan = now + self.rescan_interval
        found = inherited_connections(own_fds)
        if not found:
            return
        self._warned_connections = True
        named = ", ".join(str(c) for c in found[:_MAX_NAMED])
        if len(found) > _MAX_NAMED:
            named += f" and {len(found) - _MAX_NAMED} more"
        plural = "s" if len(found) > 1 else ""
        warnings.warn(
            f"ForkPool forks while this process holds {len(found)} open connection{plural} "
            f"that every child inherits: {named}; open them in the child instead "
            "(ForkPool(initializer=...)), or close them before the pool forks",
            ForkSafetyWarning, stacklevel=3)
