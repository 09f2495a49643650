"""Property-based checks: any bad argument gets a clear InvalidArgumentError, never a
crash or a raw package error; good ones are accepted."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ipcfork
from ipcfork._os.names import posix_name
from ipcfork._os.timeouts import check_timeout

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(st.text(max_size=300))
def test_posix_names_are_normalised_or_refused(text: str) -> None:
    try:
        normal = posix_name(text)
    except ipcfork.InvalidArgumentError as exc:
        assert exc.limit or "POSIX name" in str(exc)
        return
    assert normal.startswith("/") and "/" not in normal[1:] and "\0" not in normal
    assert 2 <= len(normal) <= 252


@SETTINGS
@given(st.one_of(st.floats(allow_nan=True), st.integers(), st.none(), st.text(max_size=3)))
def test_timeouts_are_validated(value: object) -> None:
    valid = value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and not math.isnan(value) and value >= 0
    )
    if valid:
        result = check_timeout(value)  # type: ignore[arg-type]
        if value is None or value == math.inf:
            assert result is None  # wait forever
        else:
            assert result == value and isinstance(result, float)
    else:
        with pytest.raises(ipcfork.InvalidArgumentError):
            check_timeout(value)  # type: ignore[arg-type]


@SETTINGS
@given(st.one_of(st.integers(max_value=0), st.floats(), st.text(max_size=3), st.booleans()))
def test_bad_shared_memory_sizes(size: object) -> None:
    with pytest.raises(ipcfork.InvalidArgumentError):
        ipcfork.SharedMemory(size)  # type: ignore[arg-type]


@SETTINGS
@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31),
                 st.floats(), st.booleans()))
def test_bad_semaphore_values(value: object) -> None:
    for backend in ("posix", "sysv"):
        with pytest.raises(ipcfork.InvalidArgumentError):
            ipcfork.Semaphore(value, backend=backend)  # type: ignore[arg-type]


@SETTINGS
@given(st.integers(min_value=0, max_value=32767))
def test_good_semaphore_values_are_kept(value: int) -> None:
    sem = ipcfork.Semaphore(value, backend="sysv")
    try:
        assert sem.value == value
    finally:
        sem.close()


@SETTINGS
@given(st.one_of(st.integers(), st.text(max_size=2)))
def test_ftok_proj_checked(proj: object) -> None:
    from ipcfork._os.names import sysv_key

    ok = (isinstance(proj, int) and 1 <= proj <= 255) or (
        isinstance(proj, str) and len(proj) == 1 and 1 <= ord(proj) <= 255)
    if ok:
        assert isinstance(sysv_key("/", proj), int)  # type: ignore[arg-type]
    else:
        with pytest.raises(ipcfork.InvalidArgumentError):
            sysv_key("/", proj)  # type: ignore[arg-type]
