"""The error hierarchy: built-in bases, facts in the message, pickling across fork."""

from __future__ import annotations

import pickle
import queue
import threading

import pytest

import ipcfork
from ipcfork import errors

ALL_ERRORS = [getattr(errors, name) for name in errors.__all__
              if issubclass(getattr(errors, name), errors.IpcforkError)]

BUILTIN_BASES = {
    errors.WaitTimeoutError: TimeoutError,
    errors.ObjectExistsError: FileExistsError,
    errors.ObjectNotFoundError: FileNotFoundError,
    errors.UnsafeObjectError: PermissionError,
    errors.AccessDeniedError: PermissionError,
    errors.InvalidArgumentError: ValueError,
    errors.LimitExceededError: OverflowError,
    errors.NotOwnerError: RuntimeError,
    errors.BufferInUseError: BufferError,
    errors.QueueEmptyError: queue.Empty,
    errors.QueueFullError: queue.Full,
    errors.BrokenBarrierError: threading.BrokenBarrierError,
    errors.ChildCrashedError: ChildProcessError,
    errors.TaskTimeoutError: TimeoutError,
    errors.ForkSafetyWarning: RuntimeWarning,
    errors.HugepageWarning: RuntimeWarning,
}


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_pickles_with_its_facts(cls: type[errors.IpcforkError]) -> None:
    err = cls("it broke", obj="Mutex '/x' (posix)", backend="posix", limit="n <= 3")
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is cls
    assert (clone.obj, clone.backend, clone.limit) == ("Mutex '/x' (posix)", "posix", "n <= 3")
    assert str(clone) == str(err) == "it broke (limit: n <= 3)"
    assert getattr(ipcfork, cls.__name__) is cls  # users catch it from the package
    assert cls.__doc__


@pytest.mark.parametrize(("cls", "base"), BUILTIN_BASES.items(), ids=lambda c: c.__name__)
def test_errors_subclass_the_builtin_users_catch(cls: type, base: type) -> None:
    assert issubclass(cls, base)
    with pytest.raises(base):
        raise cls("x")


def test_raised_errors_name_object_and_backend() -> None:
    with pytest.raises(ipcfork.ObjectNotFoundError) as info:
        ipcfork.Semaphore(1, "/ipcfork-test-never-made", create=False)
    assert info.value.obj == "Semaphore '/ipcfork-test-never-made' (posix)"
    assert info.value.backend == "posix"
    assert "Semaphore '/ipcfork-test-never-made' (posix)" in str(info.value)


def test_remote_traceback_and_crash_facts_pickle() -> None:
    remote = pickle.loads(pickle.dumps(ipcfork.RemoteTraceback("Traceback: ...")))
    assert str(remote) == "Traceback: ..."
    crash = errors.ChildCrashedError("gone", pid=12, exitcode=None, signal=9)
    clone = pickle.loads(pickle.dumps(crash))
    assert (clone.pid, clone.exitcode, clone.signal) == (12, None, 9)
