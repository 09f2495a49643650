"""Interop with PHP: named SysV objects made by ipcfork are usable from PHP, and the other way.

Both sides name an object by a file: the key is ``ftok(path, proj)`` (ipcfork's default proj
and PHP's ``ftok($path, "i")`` agree).  PHP runs as a separate program (``php script.php``);
data crosses as hex on argv/stdout so every comparison is byte-exact.  Each test removes every
object it or PHP made; the ``sweep`` fixture removes (and reports) any left behind by a failure,
so a failing test does not leave garbage on the machine.

The module is skipped when ``php`` is not on PATH, except under CI (``$CI`` set) where a
missing PHP fails every test instead.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sysv_ipc
from conftest import fork, reap

import ipcfork
from ipcfork import MessageQueue, Mutex, Semaphore, SharedMemory

PHP = shutil.which("php")
if PHP is None and not os.environ.get("CI"):
    pytest.skip("PHP CLI not installed ('php' is not on PATH); these tests run ipcfork "
                "against PHP's shmop/sysvmsg/sysvsem", allow_module_level=True)

PHP_EXTENSIONS = ("shmop", "sysvmsg", "sysvsem")
PHP_TIMEOUT = 60.0  # seconds for any PHP program to finish
WAIT = 30.0  # seconds to wait for a message PHP should send

# The projs (ftok's second argument) tests use with the keyfile; the sweep checks them all.
PROJS = ("i", "c", "q")

# Every PHP program starts with this: warnings (failed shmop_open, msg_send, ...) become
# exceptions, so any PHP-side failure exits non-zero and the test sees PHP's message.
PHP_PRELUDE = """<?php
declare(strict_types=1);
error_reporting(E_ALL);
set_error_handler(static function (int $no, string $msg, string $file, int $line): bool {
    throw new ErrorException($msg, 0, $no, $file, $line);
});
"""

RunPhp = Callable[..., str]


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="session")
def php() -> str:
    """The PHP CLI, checked to have the SysV extensions (fails, not skips, if unusable)."""
    if PHP is None:
        pytest.fail("$CI is set but 'php' is not on PATH: CI must run the PHP interop tests",
                    pytrace=False)
    modules = subprocess.run([PHP, "-m"], timeout=PHP_TIMEOUT, check=True,
                             capture_output=True, text=True).stdout.split()
    missing = [ext for ext in PHP_EXTENSIONS if ext not in modules]
    if missing:
        pytest.fail(f"{PHP} lacks the PHP extensions {missing} these tests need", pytrace=False)
    return PHP


def php_script(tmp_path: Path, name: str, body: str) -> Path:
    """Write ``body`` (PHP statements) after the prelude to ``tmp_path/name.php``."""
    script = tmp_path / f"{name}.php"
    script.write_text(PHP_PRELUDE + body)
    return script


def php_failure(what: str, status: int | None, out: bytes | str, err: bytes | str) -> str:
    return f"PHP {what} failed (status {status}):\nstdout: {out!r}\nstderr: {err!r}"


@pytest.fixture
def run_php(php: str, tmp_path: Path) -> RunPhp:
    """``run_php(body, *args)``: run PHP ``body`` with ``$argv[1:] == args``; its stdout."""
    counter = iter(range(1_000_000))

    def run(body: str, *args: str) -> str:
        script = php_script(tmp_path, f"step{next(counter)}", body)
        try:
            done = subprocess.run([php, str(script), *args], timeout=PHP_TIMEOUT, check=True,
                                  capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise AssertionError(php_failure(script.name, exc.returncode, exc.stdout,
                                             exc.stderr)) from None
        return done.stdout

    return run


def _raw_key(path: str, proj: str) -> int:
    """``ftok(path, proj)`` as sysv_ipc takes it."""
    return int(sysv_ipc.ftok(path, ord(proj), silence_warning=True))


def _key(path: str, proj: str) -> int:
    """``ftok(path, proj)`` as an unsigned 32-bit number (how /proc/sysvipc is compared)."""
    return _raw_key(path, proj) & 0xFFFFFFFF


def _objects_with_keys(keys: set[int]) -> list[tuple[str, int]]:
    """The SysV objects (kind, id) whose key is in ``keys``, from /proc/sysvipc."""
    found = []
    for kind in ("shm", "sem", "msg"):
        with open(f"/proc/sysvipc/{kind}") as table:
            next(table)
            for line in table:
                key, ident = line.split()[:2]
                if int(key) & 0xFFFFFFFF in keys:
                    found.append((kind, int(ident)))
    return found


@pytest.fixture
def sweep(keyfile: str) -> Iterator[None]:
    """After the test, remove any SysV object still named by ``keyfile`` and fail if any was.

    A passing test cleans up itself; this only keeps a failing one from leaving garbage.
    """
    keys = {_key(keyfile, proj) for proj in PROJS}
    yield
    left = _objects_with_keys(keys)
    removers = {"shm": sysv_ipc.remove_shared_memory, "sem": sysv_ipc.remove_semaphore,
                "msg": sysv_ipc.remove_message_queue}
    for kind, ident in left:
        with contextlib.suppress(sysv_ipc.Error):
            removers[kind](ident)
    assert not left, f"test left SysV objects named by its keyfile (now removed): {left}"


def _receive(queue: MessageQueue, mtype: int, php: subprocess.Popen[bytes]) -> bytes:
    """The next message of ``mtype``, failing at once (with PHP's output) if PHP exits first.

    Each wait is a blocking kernel receive with a short timeout; between waits we only look
    whether PHP is still alive, so a PHP failure costs a fraction of a second, not WAIT.
    """
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            data: bytes = queue.get(timeout=0.2, type=mtype)
        except ipcfork.QueueEmptyError:
            if php.poll() is not None:
                out, err = php.communicate()
                raise AssertionError(php_failure("worker", php.returncode, out, err)) from None
            continue
        return data
    raise AssertionError(f"no message of type {mtype} from PHP within {WAIT} s")


def _wait_until_queued(semaphore: sysv_ipc.Semaphore, php: subprocess.Popen[bytes]) -> None:
    """Return once a process waits on ``semaphore`` (member 0) to become non-zero.

    Spins on the kernel's wait count, yielding the CPU (no sleep); fails at once if PHP
    exits and after WAIT seconds.
    """
    deadline = time.monotonic() + WAIT
    while semaphore.waiting_for_nonzero == 0:
        if php.poll() is not None:
            out, err = php.communicate()
            raise AssertionError(php_failure("worker", php.returncode, out, err))
        if time.monotonic() > deadline:
            raise AssertionError(f"PHP did not wait on the lock within {WAIT} s")
        os.sched_yield()


# -- shared memory ------------------------------------------------------------------------


def test_php_reads_and_writes_segment_ipcfork_created(
    keyfile: str, run_php: RunPhp, sweep: None
) -> None:
    """A segment ipcfork created (0600, key ``ftok(path, "i")``) opens in PHP with
    ``shmop_open(ftok($path, "i"), "w", 0, 0)``; PHP sees Python's bytes exactly, and the
    bytes PHP writes back (its own bitwise NOT of what it read, plus a literal with NULs and
    high bytes at the end) land exactly where PHP put them."""
    size = 4096
    payload = bytes(range(256)) * 3 + b"\x00\xff\x80 not utf-8: \xc3\x28\xa0\xa1"
    back_at = 2048
    shm = SharedMemory(size, name=keyfile, backend="sysv")
    try:
        assert shm.created
        shm.buf[: len(payload)] = payload
        out = run_php(
            r"""
            [, $path, $n, $at] = $argv;
            $shm = shmop_open(ftok($path, "i"), "w", 0, 0);
            $data = shmop_read($shm, 0, (int) $n);
            shmop_write($shm, ~$data, (int) $at);
            $tail = "\x00php\xff\xfe\x00";
            shmop_write($shm, $tail, shmop_size($shm) - strlen($tail));
            echo shmop_size($shm), "\n", bin2hex($data), "\n";
            """,
            keyfile, str(len(payload)), str(back_at))
        php_size, php_saw = out.split()
        assert int(php_size) == size
        assert bytes.fromhex(php_saw) == payload
        expected = bytearray(size)
        expected[: len(payload)] = payload
        expected[back_at : back_at + len(payload)] = bytes(b ^ 0xFF for b in payload)
        expected[-7:] = b"\x00php\xff\xfe\x00"
        assert bytes(shm.buf) == bytes(expected)
    finally:
        shm.unlink()
        shm.close()


def test_ipcfork_opens_segment_php_created(keyfile: str, run_php: RunPhp, sweep: None) -> None:
    """A segment PHP created (``shmop_open(..., "n", 0600, size)``) and filled opens in
    ipcfork with ``create=False``: right size, PHP's bytes exactly, the rest zero-filled;
    ipcfork's ``unlink()`` then removes it for everyone."""
    size = 10_000
    out = run_php(
        r"""
        [, $path, $size] = $argv;
        $data = "";
        for ($i = 255; $i >= 0; $i--) { $data .= chr($i); }
        $data .= "\x00\x00PHP wrote this\x00" . random_bytes(3000);
        $shm = shmop_open(ftok($path, "i"), "n", 0600, (int) $size);
        shmop_write($shm, $data, 0);
        echo bin2hex($data);
        """,
        keyfile, str(size))
    data = bytes.fromhex(out)
    assert len(data) == 256 + 17 + 3000
    shm = SharedMemory(name=keyfile, backend="sysv", create=False)
    try:
        assert not shm.created
        assert shm.size == size
        assert bytes(shm.buf) == data + bytes(size - len(data))
    finally:
        shm.unlink()
        shm.close()
    with pytest.raises(ipcfork.ObjectNotFoundError):
        SharedMemory(name=keyfile, backend="sysv", create=False)
    out = run_php(
        r"""
        try {
            shmop_open(ftok($argv[1], "i"), "a", 0, 0);
            echo "still there";
        } catch (ErrorException $e) {
            echo $e->getMessage();
        }
        """,
        keyfile)
    assert "No such file or directory" in out


# -- message queues -------------------------------------------------------------------------


_RNG = random.Random(20240601)
# Raw messages by size: "short" ones fit sysv_ipc's default 2048-byte buffer; "long" ones go
# up to MSGMAX (8192 here), which ipcfork reports as the SysV queue's max_message_size.
RAW_MESSAGES = {
    "short": [
        b"plain ascii",
        b"",
        b"\x00",
        b"\xff\xfe\xc3\x28 invalid utf-8 \x80\xbf\xed\xa0\x80",
        bytes(range(256)),
        _RNG.randbytes(2048),
    ],
    "long": [_RNG.randbytes(8000), _RNG.randbytes(8192)],
}


def _put(queue: MessageQueue, message: bytes, mtype: int) -> None:
    """``queue.put`` that turns any failure into a clear assertion."""
    try:
        queue.put(message, timeout=WAIT, type=mtype)
    except Exception as exc:
        raise AssertionError(
            f"ipcfork could not put a raw {len(message)}-byte message on a SysV queue whose "
            f"max_message_size is {queue.max_message_size}: {type(exc).__name__}: {exc}"
        ) from exc


def _get(queue: MessageQueue, mtype: int, size: int) -> bytes:
    """``queue.get`` that turns any failure into a clear assertion."""
    try:
        data: bytes = queue.get(timeout=WAIT, type=mtype)
    except Exception as exc:
        raise AssertionError(
            f"ipcfork could not get a raw {size}-byte message from a SysV queue whose "
            f"max_message_size is {queue.max_message_size}: {type(exc).__name__}: {exc}"
        ) from exc
    return data


@pytest.mark.parametrize("sizes", sorted(RAW_MESSAGES))
def test_raw_messages_python_to_php_and_back(
    sizes: str, keyfile: str, run_php: RunPhp, sweep: None
) -> None:
    """Raw-mode messages Python puts (type 1) reach PHP (``msg_receive(..., false)``)
    byte-exact, including an empty one, NULs, non-UTF-8 bytes and, for "long", 8000 and
    8192 (MSGMAX) bytes; PHP sends each back reversed (type 2) and Python gets them, with a
    timeout, byte-exact and in order.

    The "long" case guards against sysv_ipc's default receive buffer of 2048 bytes (a queue
    opened without ``max_message_size`` could not carry the 8192 bytes ipcfork reports)."""
    messages = RAW_MESSAGES[sizes]
    queue = MessageQueue(name=keyfile, backend="sysv", raw=True)
    try:
        assert queue.created
        for message in messages:
            _put(queue, message, 1)
        out = run_php(
            r"""
            [, $path, $count] = $argv;
            $q = msg_get_queue(ftok($path, "i"));
            $sizes = [];
            for ($i = 0; $i < (int) $count; $i++) {
                // Everything was queued before PHP started: never block, fail instead.
                msg_receive($q, 1, $type, 8192, $msg, false, MSG_IPC_NOWAIT);
                msg_send($q, 2, strrev($msg), false, false);
                $sizes[] = strlen($msg);
            }
            echo implode(" ", $sizes);
            """,
            keyfile, str(len(messages)))
        assert [int(size) for size in out.split()] == [len(m) for m in messages]
        for message in messages:
            assert _get(queue, 2, len(message)) == message[::-1]
        assert queue.qsize() == 0
    finally:
        queue.unlink()
        queue.close()


@pytest.mark.parametrize("sizes", sorted(RAW_MESSAGES))
def test_raw_messages_php_to_python(
    sizes: str, keyfile: str, run_php: RunPhp, sweep: None
) -> None:
    """Raw messages PHP sends (``msg_send(..., false)``, type 3) to a queue ipcfork created
    arrive in Python byte-exact and in order: the same sizes as above, with PHP's own bytes
    (a non-UTF-8 prefix, then ``random_bytes``).

    The "long" case guards against receiving through sysv_ipc's default 2048-byte buffer
    (msgrcv would fail with E2BIG, escaping untranslated as a bare OSError)."""
    sizes_wanted = [len(m) for m in RAW_MESSAGES[sizes]]
    queue = MessageQueue(name=keyfile, backend="sysv", raw=True)
    try:
        out = run_php(
            r"""
            [, $path] = $argv;
            $q = msg_get_queue(ftok($path, "i"));
            foreach (array_slice($argv, 2) as $size) {
                $size = (int) $size;
                $msg = substr("\xff\x00\x80php\xc3\x28" . random_bytes($size + 1), 0, $size);
                msg_send($q, 3, $msg, false, false);
                echo bin2hex($msg), "\n";
            }
            """,
            keyfile, *map(str, sizes_wanted))
        sent = [bytes.fromhex(line) for line in out.split("\n")[:-1]]
        assert [len(m) for m in sent] == sizes_wanted
        for message in sent:
            assert _get(queue, 3, len(message)) == message
        assert queue.qsize() == 0
    finally:
        queue.unlink()
        queue.close()


# -- a lock shared by PHP and Python -----------------------------------------------------

COUNTER_WORKER = r"""
[, $path, $n] = $argv;
$n = (int) $n;
// PHP creates the lock (a set of three; member 0 is the lock, taken with SEM_UNDO) and the
// counter segment, then tells Python it is ready and waits for the start message.
$sem = sem_get(ftok($path, "i"), 1, 0600);
$shm = shmop_open(ftok($path, "c"), "n", 0600, 8);
shmop_write($shm, pack("P", 0), 0);
$q = msg_get_queue(ftok($path, "q"));
msg_send($q, 2, "ready", false);
msg_receive($q, 1, $type, 64, $go, false);
if ($go !== "go") { throw new RuntimeException("bad start message: " . bin2hex($go)); }
$mine = null;
$interleaved = 0;  // times the counter moved between two of our increments
for ($i = 0; $i < $n; $i++) {
    sem_acquire($sem);
    $value = unpack("P", shmop_read($shm, 0, 8))[1];
    if ($mine !== null && $value !== $mine) { $interleaved++; }
    $mine = $value + 1;
    shmop_write($shm, pack("P", $mine), 0);
    sem_release($sem);
}
msg_send($q, 2, "done $interleaved", false);
"""


def test_php_and_python_share_a_lock(
    php: str, keyfile: str, tmp_path: Path, sweep: None
) -> None:
    """One lock, one counter, two languages: a PHP worker creates the lock with
    ``sem_get(ftok($path, "i"), 1, 0600)`` and an 8-byte little-endian counter segment
    (proj "c"); after a start message both PHP (``sem_acquire``/``shmop``) and Python
    (``Mutex(create=False)`` + ``SharedMemory(create=False).buf.cast("Q")``) make N
    read-modify-write increments under the lock at the same time.  No update is lost:
    the counter ends at exactly 2N."""
    _share_a_lock(php, keyfile, tmp_path, python_first=False)


def test_php_and_python_share_a_lock_python_created(
    php: str, keyfile: str, tmp_path: Path, sweep: None
) -> None:
    """As above, but Python creates the lock (``Mutex(name, backend="sysv")``) before the
    PHP worker starts, and PHP's ``sem_get`` joins it: ipcfork makes its named sets in
    PHP's layout (three members), so ``semget(key, 3)`` finds it usable, and ipcfork
    counts itself among the set's users, so PHP does not reset the lock.

    Regression test: ipcfork at commit 490abd0 failed it (its sets had one member, and
    PHP's ``sem_get`` failed with EINVAL)."""
    _share_a_lock(php, keyfile, tmp_path, python_first=True)


def _share_a_lock(php: str, keyfile: str, tmp_path: Path, *, python_first: bool) -> None:
    assert sys.byteorder == "little", "PHP's pack('P') is little-endian; cast('Q') is native"
    n = 2000
    script = php_script(tmp_path, "counter", COUNTER_WORKER)
    with contextlib.ExitStack() as cleanup:
        queue = MessageQueue(name=keyfile, backend="sysv", raw=True, proj="q")
        cleanup.callback(queue.close)
        cleanup.callback(queue.unlink)
        if python_first:
            mutex = Mutex(name=keyfile, backend="sysv", exclusive=True)
            cleanup.callback(mutex.close)
            cleanup.callback(mutex.unlink)
        worker = subprocess.Popen([php, str(script), keyfile, str(n)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def stop_worker() -> None:
            if worker.poll() is None:
                worker.kill()
            worker.communicate(timeout=PHP_TIMEOUT)

        cleanup.callback(stop_worker)
        assert _receive(queue, 2, worker) == b"ready"

        if not python_first:
            mutex = Mutex(name=keyfile, backend="sysv", create=False)
            cleanup.callback(mutex.close)
            cleanup.callback(mutex.unlink)
        shm = SharedMemory(name=keyfile, backend="sysv", proj="c", create=False)
        cleanup.callback(shm.close)
        cleanup.callback(shm.unlink)
        assert shm.size == 8
        counter = shm.buf.cast("Q")
        cleanup.callback(counter.release)

        # Start together, and provably overlapping: hold the lock, let PHP go, and release
        # only once PHP waits in sem_acquire.  A SysV release completes a queued waiter's
        # operation at once, so PHP's first increment comes between our first two.
        mutex.acquire()
        queue.put(b"go", type=1)
        _wait_until_queued(sysv_ipc.Semaphore(_raw_key(keyfile, "i")), worker)
        mine: int | None = None
        interleaved = 0
        for i in range(n):
            if i:
                mutex.acquire()
            try:
                value = counter[0]
                if mine is not None and value != mine:
                    interleaved += 1
                mine = counter[0] = value + 1
            finally:
                mutex.release()
        done = _receive(queue, 2, worker)
        out, err = worker.communicate(timeout=PHP_TIMEOUT)
        assert worker.returncode == 0, php_failure("worker", worker.returncode, out, err)
        assert done.startswith(b"done ")
        php_interleaved = int(done.split()[1])
        assert counter[0] == 2 * n, (
            f"lost updates: counter {counter[0]} != {2 * n} (interleavings seen: "
            f"Python {interleaved}, PHP {php_interleaved})")
        assert interleaved > 0, "PHP never incremented between two of our increments"
        assert not mutex.locked()


# -- security --------------------------------------------------------------------------------

FOREIGN_MAKERS = {
    "shm": r"""
        $shm = shmop_open(ftok($argv[1], "i"), "n", 0666, 64);
        shmop_write($shm, "planted by php", 0);
        """,
    "queue": r"""
        $q = msg_get_queue(ftok($argv[1], "i"), 0666);
        msg_send($q, 1, "planted by php", false);
        """,
    "semaphore": r"""
        sem_get(ftok($argv[1], "i"), 1, 0666, false);
        """,
}


def _open_and_use(kind: str, keyfile: str, **options: bool) -> None:
    """Open the ``kind`` object named by ``keyfile`` with ipcfork, use it, and remove it."""
    if kind == "shm":
        shm = SharedMemory(name=keyfile, backend="sysv", **options)
        try:
            assert bytes(shm.buf[:14]) == b"planted by php"
        finally:
            shm.unlink()
            shm.close()
    elif kind == "queue":
        queue = MessageQueue(name=keyfile, backend="sysv", raw=True, **options)
        try:
            assert queue.get(timeout=WAIT) == b"planted by php"
        finally:
            queue.unlink()
            queue.close()
    else:
        mutex = Mutex(name=keyfile, backend="sysv", **options)
        try:
            assert mutex.acquire(timeout=WAIT)
            mutex.release()
        finally:
            mutex.unlink()
            mutex.close()


@pytest.mark.parametrize("kind", sorted(FOREIGN_MAKERS))
def test_world_writable_php_object_is_refused(
    kind: str, keyfile: str, run_php: RunPhp, sweep: None
) -> None:
    """An object PHP made with mode 0666 (anyone may write it: a squatted name) is refused
    with UnsafeObjectError, a PermissionError, both when opening (``create=False``) and in
    the default create-or-open path; ``allow_foreign=True`` opens it, and it works."""
    run_php(FOREIGN_MAKERS[kind], keyfile)
    opener: dict[str, Callable[..., object]] = {
        "shm": lambda **kw: SharedMemory(64, name=keyfile, backend="sysv", **kw),
        "queue": lambda **kw: MessageQueue(name=keyfile, backend="sysv", raw=True, **kw),
        "semaphore": lambda **kw: Mutex(name=keyfile, backend="sysv", **kw),
    }
    try:
        for create in (False, True):
            with pytest.raises(ipcfork.UnsafeObjectError) as refused:
                opener[kind](create=create)
            assert isinstance(refused.value, PermissionError)
            assert "0666" in str(refused.value)
            assert "allow_foreign" in str(refused.value)
    finally:
        _open_and_use(kind, keyfile, create=False, allow_foreign=True)


# -- interop bugs found (regression tests) ----------------------------------------------------


def test_mutex_on_php_set_leaves_same_key_segment_alone(
    keyfile: str, run_php: RunPhp, sweep: None
) -> None:
    """The common PHP idiom keys the lock and the data it guards with the same ftok key
    (``$k = ftok(__FILE__, "i"); sem_get($k); shmop_open($k, ...)``).  A Mutex opened on
    such a PHP set must not touch that data segment: acquire/release leave the data as it
    was, report no dead owner, and ``unlink()`` removes the semaphore set only.

    Regression test: ipcfork at commit 8e246a4 failed it (``Mutex._open_state`` opened
    whatever segment had the semaphore's key as its owner word, so it read PHP's data as a
    dead holder's token, overwrote it with its own token on acquire, zeroed it on release,
    and removed PHP's segment on unlink)."""
    assert sys.byteorder == "little", "PHP's pack('P') is little-endian; cast('Q') is native"
    run_php(
        r"""
        $k = ftok($argv[1], "i");
        sem_get($k, 1, 0600);
        $shm = shmop_open($k, "n", 0600, 8);
        shmop_write($shm, pack("P", 12345), 0);
        """,
        keyfile)
    php_segment = [obj for obj in _objects_with_keys({_key(keyfile, "i")}) if obj[0] == "shm"]
    assert len(php_segment) == 1
    problems: list[str] = []
    data = SharedMemory(name=keyfile, backend="sysv", create=False)
    try:
        words = data.buf.cast("Q")
        mutex = Mutex(name=keyfile, backend="sysv", create=False)
        try:
            assert mutex.acquire(timeout=WAIT)
            if words[0] != 12345:
                problems.append(f"acquire overwrote PHP's data: 12345 -> {words[0]}")
            if mutex.previous_owner_died:
                problems.append(
                    f"acquire reported a dead previous owner (pid {mutex.dead_owner_pid}) "
                    "for a set nobody held")
            mutex.release()
            if words[0] != 12345:
                problems.append(f"release overwrote PHP's data: 12345 -> {words[0]}")
        finally:
            words.release()
            mutex.unlink()
            mutex.close()
        if _objects_with_keys({_key(keyfile, "i")}) != php_segment:
            problems.append("Mutex.unlink() removed PHP's data segment, not only the lock")
    finally:
        with contextlib.suppress(ipcfork.ObjectNotFoundError):
            data.unlink()
        data.close()
    assert not problems, "Mutex clobbers a same-key PHP segment: " + "; ".join(problems)


def test_php_sem_get_keeps_a_lock_python_holds(
    keyfile: str, run_php: RunPhp, sweep: None
) -> None:
    """PHP's ``sem_get`` resets member 0 to ``max_acquire`` whenever it finds itself the set's
    only user (member 1, the usage count PHP keeps with SEM_UNDO, is 0 before its own +1).
    A Mutex holding a PHP-made lock must count as a user, so a PHP request that starts while
    only Python holds the lock waits for it instead of resetting it: PHP's non-blocking
    ``sem_acquire`` must fail while Python holds the lock, and after Python's release the
    lock must be a lock again (value 1, not 2).

    Without ipcfork's part in PHP's usage count, PHP's ``sem_get`` would set the value back
    to 1 while Python holds the lock, PHP would acquire too (two holders), and Python's
    release would then leave the value at 2 for good."""
    run_php('sem_get(ftok($argv[1], "i"), 1, 0600);', keyfile)  # made; PHP has exited
    problems: list[str] = []
    mutex = Mutex(name=keyfile, backend="sysv", create=False)
    try:
        assert mutex.acquire(timeout=WAIT)
        try:
            out = run_php(
                r"""
                $sem = sem_get(ftok($argv[1], "i"), 1, 0600);
                if (sem_acquire($sem, true)) {
                    echo "acquired";
                    sem_release($sem);
                } else {
                    echo "busy";
                }
                """,
                keyfile)
        finally:
            mutex.release()
        if out != "busy":
            problems.append(f"PHP took the lock while Python held it (PHP said {out!r})")
        value = sysv_ipc.Semaphore(_raw_key(keyfile, "i")).value
        if value != 1:
            problems.append(f"after Python's release the lock's value is {value}, not 1")
    finally:
        mutex.unlink()
        mutex.close()
    assert not problems, "a PHP sem_get broke a lock Python held: " + "; ".join(problems)


# -- PHP joins what ipcfork created (and ipcfork's Semaphore joins what PHP created) ----------


def _nsems(semid: int) -> int:
    """How many members SysV set ``semid`` has, from /proc/sysvipc/sem."""
    with open("/proc/sysvipc/sem") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1]) == semid:
                return int(fields[3])
    raise AssertionError(f"no SysV semaphore set {semid}")


# PHP's view of a semaphore: join it with sem_get(key, max_acquire, 0600) and take it without
# waiting as often as asked, printing "acquired" or "busy" each time.
PHP_TRY_ACQUIRE = r"""
[, $path, $max, $tries] = $argv;
$sem = sem_get(ftok($path, "i"), (int) $max, 0600);
$said = [];
for ($i = 0; $i < (int) $tries; $i++) {
    $said[] = sem_acquire($sem, true) ? "acquired" : "busy";
}
echo implode(" ", $said);
"""


def test_php_joins_a_mutex_ipcfork_created(
    keyfile: str, run_php: RunPhp, sweep: None
) -> None:
    """A named SysV Mutex ipcfork created has PHP's layout (three members: lock, usage
    count, init guard), so PHP's ``sem_get`` joins it: while Python holds the lock PHP's
    non-blocking ``sem_acquire`` says busy (ipcfork counts as a user, so ``sem_get`` did not
    reset the lock); once released PHP takes it; the lock's value stays 1.  The owner word
    (segment keyed ``ftok(path, proj ^ 0x80)``) still works: a holder SIGKILLed in a child
    is reported to the next holder.

    Regression test: ipcfork at commit 490abd0 failed it (a one-member set: PHP's
    ``sem_get`` failed with EINVAL)."""
    mutex = Mutex(name=keyfile, backend="sysv", exclusive=True)
    try:
        raw = sysv_ipc.Semaphore(_raw_key(keyfile, "i"))
        assert _nsems(raw.id) == 3
        owner_key = _raw_key(keyfile, chr(ord("i") ^ 0x80)) & 0xFFFFFFFF
        assert [kind for kind, _ in _objects_with_keys({owner_key})] == ["shm"]
        assert mutex.acquire(timeout=WAIT)
        try:
            assert mutex.owner == os.getpid()
            assert run_php(PHP_TRY_ACQUIRE, keyfile, "1", "1") == "busy"
        finally:
            mutex.release()
        assert run_php(PHP_TRY_ACQUIRE, keyfile, "1", "2") == "acquired busy"
        assert raw.value == 1, "PHP's sem_get reset the lock"

        def die_holding() -> None:
            assert mutex.acquire(timeout=WAIT)
            os.kill(os.getpid(), signal.SIGKILL)

        child = fork(die_holding)
        assert reap(child) == -signal.SIGKILL
        assert mutex.acquire(timeout=WAIT)
        try:
            assert mutex.previous_owner_died and mutex.dead_owner_pid == child
            assert run_php(PHP_TRY_ACQUIRE, keyfile, "1", "1") == "busy"
        finally:
            mutex.release()
        assert raw.value == 1
    finally:
        mutex.unlink()
        mutex.close()


def test_php_joins_a_semaphore_ipcfork_created(
    keyfile: str, run_php: RunPhp, sweep: None
) -> None:
    """A named SysV Semaphore ipcfork created (value 2) has PHP's layout, and PHP's
    ``sem_get(key, 2)`` joins it without resetting it: with one unit taken by Python, PHP
    gets exactly one more; PHP's auto-release at exit gives it back.

    Regression test: ipcfork at commit 490abd0 failed it (a one-member set: PHP's
    ``sem_get`` failed with EINVAL)."""
    sem = Semaphore(2, name=keyfile, backend="sysv", exclusive=True)
    try:
        assert _nsems(sysv_ipc.Semaphore(_raw_key(keyfile, "i")).id) == 3
        assert sem.acquire(timeout=WAIT)
        assert run_php(PHP_TRY_ACQUIRE, keyfile, "2", "2") == "acquired busy"
        assert sem.value == 1
        sem.release()
        assert run_php(PHP_TRY_ACQUIRE, keyfile, "2", "3") == "acquired acquired busy"
        assert sem.value == 2
    finally:
        sem.unlink()
        sem.close()


def test_semaphore_on_php_set_is_not_reset_by_php(
    keyfile: str, run_php: RunPhp, sweep: None
) -> None:
    """PHP creates a semaphore (``sem_get(key, 3)``: value 3) and exits; a Semaphore opened
    on it (``create=False``) counts among its users, so a later ``sem_get`` does not reset
    the value while Python has it open: with one unit taken by Python, PHP gets two, not
    three.

    Regression test: ipcfork at commit 490abd0 failed it (only Mutex joined PHP's usage
    count, so PHP reset the value to 3 under a Semaphore that had taken a unit)."""
    run_php('sem_get(ftok($argv[1], "i"), 3, 0600);', keyfile)
    sem = Semaphore(name=keyfile, backend="sysv", create=False)
    try:
        assert sem.value == 3
        assert sem.acquire(timeout=WAIT)
        assert run_php(PHP_TRY_ACQUIRE, keyfile, "3", "3") == "acquired acquired busy"
        assert sem.value == 2
    finally:
        sem.unlink()
        sem.close()
