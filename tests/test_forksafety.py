"""Fork-safety warnings: inherited connections, web-server processes, other threads.

Real objects only: TCP, UDP and AF_UNIX sockets on this machine, SQLite databases in
tmp_path, wsgiref's server handling a request in this process, and a real gunicorn whose
sync worker runs the check and sends back what it saw.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import traceback
import warnings
import wsgiref.simple_server
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcfork import ForkPool, ForkSafetyWarning
from ipcfork.pool.forksafety import Connection, ForkSafety, inherited_connections, web_server

Tcp = tuple[socket.socket, socket.socket, socket.socket]
WEB_ADVICE = ("every child gets a copy of the server's sockets, threads and memory, and holds "
              "up the requests this process serves; do the work outside the web process (a "
              "job queue or a separate service), or pass fork_safety_checks=False")


@contextlib.contextmanager
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """The ForkSafetyWarnings issued in the block, every one of them (no dedup)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found: list[warnings.WarningMessage] = []
        yield found
    found.extend(w for w in caught if issubclass(w.category, ForkSafetyWarning))


def connections_warning(caught: list[warnings.WarningMessage]) -> str:
    texts = [str(w.message) for w in caught
             if str(w.message).startswith("ForkPool forks while this process holds")]
    assert len(texts) == 1, f"expected one connections warning, got {texts}"
    return texts[0]


@contextlib.contextmanager
def busy_thread(name: str) -> Iterator[None]:
    """Another thread, alive (waiting) for the duration of the block."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, args=(30,), name=name)
    other.start()
    try:
        yield
    finally:
        stop.set()
        other.join()


@pytest.fixture
def baseline() -> set[int]:
    """Connections this test process held before the test (none, unless the machine
    passed some in): excluded like a pool's own descriptors, so only ours count."""
    return {c.fd for c in inherited_connections()}


@pytest.fixture
def tcp(baseline: set[int]) -> Iterator[Tcp]:
    """(listener, client, accepted): a real TCP connection over loopback (opened after
    ``baseline`` looked, or the baseline would exclude it)."""
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname(), timeout=30) as client:
        accepted, _ = listener.accept()
        with accepted:
            yield listener, client, accepted


def by_fd(found: list[Connection]) -> dict[int, str]:
    return {c.fd: str(c) for c in found}


# --- inherited connections -------------------------------------------------------------

def test_both_ends_of_a_tcp_connection_are_named(tcp: Tcp, baseline: set[int]) -> None:
    listener, client, accepted = tcp
    port = listener.getsockname()[1]
    client_port = client.getsockname()[1]
    with recorded() as caught:
        ForkSafety().before_fork(own_fds=baseline)
    text = connections_warning(caught)
    assert text.startswith("ForkPool forks while this process holds 2 open connections "
                           "that every child inherits: ")
    assert f"fd {client.fileno()} TCP 127.0.0.1:{port}" in text
    assert f"fd {accepted.fileno()} TCP 127.0.0.1:{client_port}" in text
    assert f"fd {listener.fileno()} " not in text  # listening: shared by design
    assert "initializer=" in text


def test_a_well_known_port_names_its_server(baseline: set[int]) -> None:
    servers = {5432: "PostgreSQL", 3306: "MySQL", 6379: "Redis", 27017: "MongoDB",
               11211: "memcached"}
    for port, server in servers.items():
        try:
            listener = socket.create_server(("127.0.0.1", port))
        except OSError:  # a real server holds it: try the next
            continue
        with listener, socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            found = by_fd(inherited_connections(baseline))[client.fileno()]
            assert found == f"fd {client.fileno()} TCP 127.0.0.1:{port} ({server})"
        return
    pytest.fail(f"all of {sorted(servers)} are taken on 127.0.0.1")


def test_a_unix_socket_to_a_named_server_is_named(tmp_path: Path, baseline: set[int]) -> None:
    path = str(tmp_path / ".s.PGSQL.5432")  # PostgreSQL's own socket name
    with socket.create_server(path, family=socket.AF_UNIX) as listener, \
            socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        accepted, _ = listener.accept()
        with accepted:
            assert by_fd(inherited_connections(baseline)) == {
                client.fileno(): f"fd {client.fileno()} UNIX {path} (PostgreSQL)",
                accepted.fileno(): f"fd {accepted.fileno()} UNIX accepted on {path} (PostgreSQL)"}


def test_a_connected_udp_socket_is_named_an_unconnected_one_is_not(baseline: set[int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))  # bound, not connected: receives from anyone
        client.connect(server.getsockname())
        port = server.getsockname()[1]
        assert by_fd(inherited_connections(baseline)) == {
            client.fileno(): f"fd {client.fileno()} UDP 127.0.0.1:{port}"}


def test_an_open_sqlite_database_is_named(tmp_path: Path, baseline: set[int]) -> None:
    path = tmp_path / "app.db"
    database = sqlite3.connect(path)
    try:
        database.execute("CREATE TABLE t (x)")  # writes the header: a database now
        database.commit()
        with recorded() as caught:
            ForkSafety().before_fork(own_fds=baseline)
        text = connections_warning(caught)
        assert "holds 1 open connection that every child inherits: fd " in text
        assert f" SQLite {path};" in text
    finally:
        database.close()
    assert inherited_connections(baseline) == []  # closed: nothing left to inherit


def test_socketpairs_listeners_log_and_unconnected_sockets_are_not_reported(
        tmp_path: Path, baseline: set[int]) -> None:
    left, right = socket.socketpair()
    dgram_left, dgram_right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right, dgram_left, dgram_right, \
            socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_server(("::1", 0), family=socket.AF_INET6) as listener6, \
            socket.socket() as unconnected, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as log, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as logger:
        log.bind(str(tmp_path / "log"))  # a syslog-like datagram socket...
        logger.connect(str(tmp_path / "log"))  # ...and SysLogHandler's way to it
        ours = {s.fileno() for s in (left, right, dgram_left, dgram_right, listener,
                                     listener6, unconnected, log, logger)}
        assert not ours & {c.fd for c in inherited_connections()}
        assert inherited_connections(baseline) == []
        with recorded() as caught:
            ForkSafety().before_fork(own_fds=baseline)
        assert caught == []


def test_the_pools_own_descriptors_are_not_reported(tcp: Tcp, baseline: set[int]) -> None:
    _, client, accepted = tcp
    with recorded() as caught:
        ForkSafety().before_fork(own_fds={*baseline, client.fileno(), accepted.fileno()})
    assert caught == []


def test_a_long_list_is_cut_short(baseline: set[int]) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener, \
            contextlib.ExitStack() as stack:
        clients = [stack.enter_context(socket.create_connection(listener.getsockname(),
                                                                timeout=30))
                   for _ in range(12)]  # queued, never accepted: 12 connections
        with recorded() as caught:
            ForkSafety().before_fork(own_fds=baseline)
        text = connections_warning(caught)
        assert "holds 12 open connections" in text and " and 2 more;" in text
        assert text.count(" TCP 127.0.0.1:") == 10
        assert f"fd {clients[0].fileno()} TCP" in text


def test_each_pool_warns_once(tcp: Tcp, baseline: set[int]) -> None:
    _, client, _ = tcp
    checks = ForkSafety(rescan_interval=0)  # a scan at every fork, were it not for once
    with recorded() as caught:
        checks.before_fork(own_fds=baseline)
        with socket.create_connection(client.getpeername(), timeout=30):
            checks.before_fork(own_fds=baseline)
            checks.before_fork(own_fds=baseline)
    assert f"fd {client.fileno()} TCP" in connections_warning(caught)
    with recorded() as caught:  # another pool: its own warning
        ForkSafety().before_fork(own_fds=baseline)
    assert f"fd {client.fileno()} TCP" in connections_warning(caught)


def test_a_connection_opened_later_is_named_once_the_rescan_is_due(baseline: set[int]) -> None:
    eager, lazy = ForkSafety(rescan_interval=0), ForkSafety(rescan_interval=3600)
    with recorded() as caught:
        eager.before_fork(own_fds=baseline)  # the first fork: scanned, nothing found
        lazy.before_fork(own_fds=baseline)
    assert caught == []
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname(), timeout=30) as client:
        with recorded() as caught:
            lazy.before_fork(own_fds=baseline)  # not due for an hour: no scan
        assert caught == []
        with recorded() as caught:
            eager.before_fork(own_fds=baseline)
        assert f"fd {client.fileno()} TCP" in connections_warning(caught)


def test_warnings_filters_silence_it_or_make_it_an_error(tcp: Tcp, baseline: set[int]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "ForkPool forks while this process holds",
                                ForkSafetyWarning)
        ForkSafety().before_fork(own_fds=baseline)
    assert caught == []
    checks = ForkSafety(rescan_interval=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForkSafetyWarning)
        with pytest.raises(ForkSafetyWarning, match=r"holds 2 open connections"):
            checks.before_fork(own_fds=baseline)
        checks.before_fork(own_fds=baseline)  # warned (as an error) already: silent now


def test_disabled_checks_say_nothing(tcp: Tcp) -> None:
    with busy_thread("busy-worker"), recorded() as caught:
        ForkSafety(enabled=False).before_fork()
    assert caught == []

    def app() -> None:
        ForkSafety(enabled=False).at_pool_creation()

    assert serve_one_request(app) == []


# --- other threads -----------------------------------------------------------------------

def test_other_threads_are_named_once_and_our_own_are_not() -> None:
    checks = ForkSafety()
    with busy_thread("busy-worker"), busy_thread("ipcfork-manager-7"), recorded() as caught:
        checks.before_fork()
        checks.before_fork()
    texts = [str(w.message) for w in caught if "other threads" in str(w.message)]
    assert texts == ["ForkPool forks while other threads run (busy-worker); a child that "
                     "needs a lock one of them held at fork time will deadlock"]


# --- web-server processes ------------------------------------------------------------------

class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test's output is not the place for an access log


def serve_one_request(inside: Callable[[], None]) -> list[warnings.WarningMessage]:
    """Serve one real HTTP request with wsgiref in this thread; the app runs ``inside()``
    and the ForkSafetyWarnings it caused are returned.  The request is sent before the
    server accepts it (the kernel queues it), so no second thread is needed."""
    seen: list[warnings.WarningMessage] = []
    failures: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        try:
            with recorded() as caught:
                inside()
            seen.extend(caught)
        except BaseException as exc:  # wsgiref would only log it: report it below
            failures.append(exc)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    with wsgiref.simple_server.make_server("127.0.0.1", 0, app,
                                           handler_class=QuietHandler) as server, \
            socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as client:
        client.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        server.handle_request()
        response = b"".join(iter(lambda: client.recv(65536), b""))
    if failures:
        raise failures[0]
    assert response.startswith(b"HTTP/1.0 200") and response.endswith(b"ok"), response
    return seen


def test_a_test_run_is_not_a_web_process() -> None:
    assert web_server() is None
    with recorded() as caught:
        ForkSafety().at_pool_creation()
    assert caught == []


def test_a_request_handler_is_a_web_process_and_the_warning_names_its_line() -> None:
    servers: list[str | None] = []
    lines: list[int] = []

    def handler() -> None:
        servers.append(web_server())
        lines.append(sys._getframe().f_lineno + 1)
        ForkSafety().at_pool_creation()

    caught = serve_one_request(handler)
    assert servers == ["wsgiref's simple_server"]
    assert [str(w.message) for w in caught] == [
        f"ForkPool created inside wsgiref's simple_server (pid {os.getpid()}): {WEB_ADVICE}"]
    assert (caught[0].filename, caught[0].lineno) == (__file__, lines[0])


def test_the_warning_names_the_first_frame_outside_ipcfork() -> None:
    # A stand-in for ForkPool.__init__: a function whose module is inside ipcfork.
    namespace: dict[str, Any] = {"__name__": "ipcfork.pool.stand_in"}
    exec(compile("def make_pool(checks):\n    checks.at_pool_creation()\n",
                 "ipcfork/pool/stand_in.py", "exec"), namespace)
    lines: list[int] = []

    def handler() -> None:
        lines.append(sys._getframe().f_lineno + 1)
        namespace["make_pool"](ForkSafety())

    caught = serve_one_request(handler)
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, lines[0])]


def test_a_server_serving_in_another_thread_is_not_this_threads_business() -> None:
    entered, release = threading.Event(), threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        entered.set()
        release.wait(30)
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    with wsgiref.simple_server.make_server("127.0.0.1", 0, app,
                                           handler_class=QuietHandler) as server, \
            socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as client:
        client.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        thread = threading.Thread(target=server.handle_request, name="test-server")
        thread.start()
        try:
            assert entered.wait(30), "the server thread never ran the app"
            # The server thread is inside wsgiref's request handler right now.
            stack = traceback.extract_stack(sys._current_frames()[thread.ident or 0])
            assert any(f.filename.endswith("wsgiref/simple_server.py") for f in stack)
            assert web_server() is None
        finally:
            release.set()
            thread.join(30)


# --- a real gunicorn -----------------------------------------------------------------------

GUNICORN_APP = '''
import json, os, warnings

from ipcfork.pool.forksafety import ForkSafety, web_server


def app(environ, start_response):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if environ["PATH_INFO"] == "/pool":
            from ipcfork import ForkPool
            with ForkPool(1) as pool:
                pool.submit(int).result(timeout=30)
        else:
            ForkSafety().at_pool_creation()
    body = json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(), "server": web_server(),
        "warnings": [[w.category.__name__, str(w.message), w.filename] for w in caught],
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


@contextlib.contextmanager
def gunicorn(tmp_path: Path) -> Iterator[Callable[[str], dict[str, Any]]]:
    """A real gunicorn (one sync worker) serving GUNICORN_APP on a loopback port; yields a
    function that GETs a path and returns the JSON answer.  On leaving, the arbiter gets
    SIGTERM, then its whole process group SIGKILL (a worker left behind, or anything the
    app forked), and is reaped."""
    (tmp_path / "fsapp.py").write_text(GUNICORN_APP)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # A config file, not options: settings an older gunicorn lacks are ignored there.
    (tmp_path / "conf.py").write_text(
        f"bind = ['fd://{listener.fileno()}']\nworkers = 1\nworker_class = 'sync'\n"
        f"chdir = {str(tmp_path)!r}\nworker_tmp_dir = {str(tmp_path)!r}\n"
        "graceful_timeout = 5\ntimeout = 60\nloglevel = 'warning'\n"
        "control_socket_disable = True\n")
    log = tmp_path / "gunicorn.log"
    with listener, open(log, "wb") as out:
        arbiter = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(tmp_path / "conf.py"), "fsapp:app"],
            pass_fds=[listener.fileno()], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True)  # its own process group: one killpg ends all of it
    # The listener is open before gunicorn starts: a request waits in its backlog until
    # the worker is up, so nothing polls for readiness.

    def get(path: str) -> dict[str, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 200, log.read_text()
            answer: dict[str, Any] = json.loads(response.read())
        except OSError as exc:  # refused (gunicorn is gone), reset, timed out
            raise AssertionError(f"{exc}; gunicorn's log: {log.read_text()}") from None
        finally:
            connection.close()
        return answer

    try:
        yield get
    finally:
        arbiter.send_signal(signal.SIGTERM)
        pidfd = os.pidfd_open(arbiter.pid)
        try:
            select.select([pidfd], [], [], 30)  # until it exited, 30 s at most
        finally:
            os.close(pidfd)
        # Not reaped yet, so its pid (the group's id) cannot have been reused.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(arbiter.pid, signal.SIGKILL)
        arbiter.wait()


def test_a_gunicorn_worker_is_a_web_process(tmp_path: Path) -> None:
    with gunicorn(tmp_path) as get:
        answer = get("/")
    assert answer["server"] == "a gunicorn worker"
    assert answer["pid"] != os.getpid() and answer["ppid"] != os.getpid()  # the arbiter's
    assert answer["warnings"] == [[
        "ForkSafetyWarning",
        f"ForkPool created inside a gunicorn worker (pid {answer['pid']}): {WEB_ADVICE}",
        str(tmp_path / "fsapp.py")]]


# --- through ForkPool (once ForkPool takes fork_safety_checks) -------------------------------

def test_forkpool_names_an_inherited_connection_once(tcp: Tcp) -> None:
    listener, client, _ = tcp
    with recorded() as caught, ForkPool(1) as pool:
        assert [pool.submit(int, "7").result(timeout=30) for _ in range(3)] == [7, 7, 7]
    text = connections_warning(caught)
    assert f"fd {client.fileno()} TCP 127.0.0.1:{listener.getsockname()[1]}" in text


def test_forkpool_fork_safety_checks_false_is_silent(tcp: Tcp) -> None:
    with busy_thread("busy-worker"), recorded() as caught, \
            ForkPool(1, fork_safety_checks=False) as pool:
        assert pool.submit(int, "7").result(timeout=30) == 7
    assert caught == []


def test_forkpool_in_a_request_handler_warns_at_the_call() -> None:
    lines: list[int] = []

    def handler() -> None:
        lines.append(sys._getframe().f_lineno + 1)
        with ForkPool(1):
            pass

    caught = serve_one_request(handler)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert str(caught[0].message).startswith("ForkPool created inside wsgiref's")
    assert (caught[0].filename, caught[0].lineno) == (__file__, lines[0])


def test_forkpool_in_a_gunicorn_worker_warns(tmp_path: Path) -> None:
    with gunicorn(tmp_path) as get:
        answer = get("/pool")
    messages = [message for _, message, _ in answer["warnings"]]
    assert any(m.startswith("ForkPool created inside a gunicorn worker") for m in messages)
    # The request's own connection is open while the pool forks: every child inherits it.
    assert any(m.startswith("ForkPool forks while this process holds") and " TCP 127.0.0.1:"
               in m for m in messages), messages
