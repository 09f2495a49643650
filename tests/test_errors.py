"""The error hierarchy: built-in bases, facts in the message, pickling across fork."""

from __future__ import annotations

import pickle
import queue
import threading

import pytest

import ipcfork
from ipcfork import errors

ALL_ERRORS = [getattr(errors, name) for name in errors.__all__]

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
}


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_pickles_with_its_facts(cls: type[errors.IpcforkError]) -> None:
    err = cls("it broke", obj="Mutex '/x' (posix)", backend="posix", limit="n <= 3")
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is cls
    assert (clone.obj, clone.backend, clone.limit) == ("Mutex '/x' (posix)", "posix", "n <= 3")
    assert str(clone) == str(err) == "it broke (limit: n <= 3)"
    assert isinstance(clone, ipcfork.IpcforkError)
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
