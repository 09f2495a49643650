"""collapse_hugepages: real memory, real madvise, real fork.

Every collapse runs in a forked child (``in_child``), so the test process's own memory is
never advised or collapsed and each test starts from the same state; the child's report and
warnings come back pickled through a pipe.  Facts are checked against /proc/self/smaps of
the mapping that holds the test's buffer.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import pickle
import platform
import select
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import fork, reap

from ipcfork._os import hugepages
from ipcfork._os.hugepages import HugepageReport, collapse_hugepages
from ipcfork.errors import HugepageWarning, InvalidArgumentError, ObjectNotFoundError

MIB = 1 << 20
PAGE = mmap.PAGESIZE
HPAGE = 2 * MIB
MODE = hugepages.thp_mode()
UNKNOWN_ADVICE = 12345  # no madvise advice has this number: the kernel answers EINVAL

needs_thp = pytest.mark.skipif(MODE not in ("always", "madvise"),
                               reason=f"transparent huge pages are {MODE!r} on this machine")
needs_collapse = pytest.mark.skipif(not hugepages.collapse_supported(),
                                    reason="this kernel has no MADV_COLLAPSE (Linux < 6.1)")


# -- helpers ------------------------------------------------------------------------------


def in_child(body: Callable[[], Any], timeout: float = 45.0) -> tuple[Any, list[tuple[str, str]]]:
    """Run ``body()`` in a forked child; return its result and the warnings it raised as
    ``(category name, message)``.  An exception in the child is raised here."""
    r, w = os.pipe()

    def target() -> None:
        os.close(r)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome: tuple[str, Any] = ("ok", body())
            except BaseException as exc:
                outcome = ("raised", (exc, traceback.format_exc()))
        seen = [(w.category.__name__, str(w.message)) for w in caught]
        with os.fdopen(w, "wb") as out:
            pickle.dump((outcome, seen), out)

    pid = fork(target)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"child gave no answer within {timeout} s")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        status = reap(pid)
    assert status == 0, f"child exited with {status}"
    (kind, value), seen = pickle.loads(b"".join(chunks))
    if kind == "raised":
        exc, text = value
        raise exc from AssertionError(f"in the child:\n{text}")
    return value, seen


def address_of(buffer: bytearray | mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # release the export, so the buffer can be closed or resized later


def mapping_at(address: int) -> dict[str, Any]:
    """smaps facts of the mapping holding ``address``: start, end, Rss and AnonHugePages in
    bytes, VmFlags as a set."""
    facts: dict[str, Any] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line[0] in "0123456789abcdef":
                if facts is not None:
                    break
                low, high = (int(edge, 16) for edge in line.split()[0].split("-"))
                if low <= address < high:
                    facts = {"start": low, "end": high}
            elif facts is not None:
                name, _, rest = line.partition(":")
                if name == "VmFlags":
                    facts["VmFlags"] = set(rest.split())
                elif name in ("Rss", "AnonHugePages"):
                    facts[name] = int(rest.split()[0]) * 1024
    assert facts is not None, f"no mapping holds {address:#x}"
    return facts


def process_anon_huge() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no AnonHugePages in /proc/self/smaps_rollup")


def touched(size: int, byte: int = 1) -> bytearray:
    """A bytearray of ``size`` bytes, each ``byte``: every page written (resident, ours)."""
    return bytearray(bytes([byte])) * size


def private_map(size: int) -> tuple[mmap.mmap, int]:
    """A private anonymous mapping of ``size`` bytes and its first huge-page boundary."""
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = address_of(area)
    return area, -(-start // HPAGE) * HPAGE - start


def huge_warnings(seen: list[tuple[str, str]]) -> list[str]:
    return [message for category, message in seen if category == "HugepageWarning"]


# -- collapse -----------------------------------------------------------------------------


@needs_thp
@needs_collapse
def test_collapse_reports_what_proc_shows() -> None:
    def body() -> tuple[Any, ...]:
        buffer = touched(64 * MIB)
        where = address_of(buffer)
        before = mapping_at(where)
        report = collapse_hugepages()
        after = mapping_at(where)
        now = process_anon_huge()
        again = collapse_hugepages()
        return report, before, after, now, again

    (report, before, after, now, again), seen = in_child(body)
    assert seen == []
    assert isinstance(report, HugepageReport)
    assert (report.mode, report.collapse, report.fallback) == (MODE, True, None)
    # The buffer holds at least 31 whole huge pages; the kernel mapped them huge.
    assert after["AnonHugePages"] >= 62 * MIB
    assert "hg" in after["VmFlags"]
    assert report.regions >= 1
    assert 62 * MIB <= report.bytes_huge <= report.bytes_advised
    grown = after["AnonHugePages"] - before["AnonHugePages"]
    assert report.huge_after - report.huge_before >= grown
    assert report.bytes_collapsed == report.huge_after - report.huge_before
    # Only reads of /proc ran between the report and this look.
    assert abs(now - report.huge_after) <= 4 * HPAGE
    assert report.rss_growth < 64 * MIB  # densely used memory: filling costs little
    assert 0 < report.seconds < 30
    line = report.summary()
    assert "\n" not in line
    assert f"{report.bytes_collapsed / MIB:,.0f} MiB collapsed" in line
    # A second call finds the memory already huge: nothing left to collapse, all counted.
    assert again.bytes_huge >= 62 * MIB
    assert again.bytes_collapsed < 62 * MIB


@needs_thp
@needs_collapse
def test_a_pool_with_hugepages_collapses_once_before_its_first_fork() -> None:
    def body() -> tuple[Any, ...]:
        import ipcfork

        buffer = touched(64 * MIB, byte=7)
        where = address_of(buffer)
        with ipcfork.ForkPool(1, hugepages=True) as pool:
            before = pool.hugepages_report
            seen_by_children = [pool.submit(lambda i: buffer[i * MIB], i).result(timeout=30)
                                for i in range(0, 64, 16)]
            report = pool.hugepages_report
            later = pool.submit(len, buffer).result(timeout=30)
            same_report = pool.hugepages_report is report
        return before, report, seen_by_children, later, same_report, mapping_at(where)

    (before, report, seen_by_children, later, same_report, after), seen = in_child(body)
    assert seen == []
    assert before is None  # nothing before the first fork
    assert isinstance(report, HugepageReport) and report.bytes_huge >= 62 * MIB
    assert after["AnonHugePages"] >= 62 * MIB
    assert seen_by_children == [7, 7, 7, 7] and later == 64 * MIB  # the data stays visible
    assert same_report  # once per pool


@needs_thp
@needs_collapse
def test_copy_on_write_is_unchanged_after_collapse() -> None:
    child_spots = [i * HPAGE + 123 for i in range(32)]
    parent_spots = [i * HPAGE + 4567 for i in range(32)]

    def body() -> tuple[int, list[int], list[int], int]:
        buffer = touched(66 * MIB)
        collapse_hugepages()
        huge = mapping_at(address_of(buffer))["AnonHugePages"]
        to_child, to_parent = os.pipe(), os.pipe()

        def child() -> int:
            for spot in child_spots:
                buffer[spot] = 2
            os.write(to_parent[1], b"w")
            ready, _, _ = select.select([to_child[0]], [], [], 30)
            assert ready and os.read(to_child[0], 1) == b"p"
            wrong = 0
            if any(buffer[spot] != 1 for spot in parent_spots):
                wrong |= 1  # the parent's later writes showed through
            if any(buffer[spot] != 2 for spot in child_spots):
                wrong |= 2  # our own writes were lost
            return wrong

        pid = fork(child)
        try:
            ready, _, _ = select.select([to_parent[0]], [], [], 30)
            assert ready and os.read(to_parent[0], 1) == b"w"
            seen_by_parent = [buffer[spot] for spot in child_spots]
            for spot in parent_spots:
                buffer[spot] = 3
            os.write(to_child[1], b"p")
        finally:
            status = reap(pid)
            for fd in (*to_child, *to_parent):
                os.close(fd)
        return huge, seen_by_parent, [buffer[spot] for spot in parent_spots], status

    (huge, seen_by_parent, own, status), _ = in_child(body)
    assert huge >= 62 * MIB, "the buffer was not collapsed: the test would prove nothing"
    assert set(seen_by_parent) == {1}, "the child's writes reached the parent"
    assert set(own) == {3}
    assert status == 0, {1: "the parent's writes reached the child",
                         2: "the child lost its own writes"}.get(status, status)


def _kernel_at_least(major: int, minor: int) -> bool:
    numbers = platform.release().split("-")[0].split(".")
    return (int(numbers[0]), int(numbers[1])) >= (major, minor)


@needs_thp
@needs_collapse
@pytest.mark.skipif(not _kernel_at_least(5, 8),
                    reason="before Linux 5.8 a write to a shared huge page copied 2 MiB")
def test_first_write_after_fork_copies_a_small_page_not_a_huge_one() -> None:
    """The memory cost the documentation states: a child's first write into a shared huge
    page copies one 4 KiB page (it splits the child's mapping), not 2 MiB."""
    writes = 32

    def body() -> tuple[int, int]:
        buffer = touched(66 * MIB)
        collapse_hugepages()
        reply = os.pipe()

        def child() -> None:
            shared = mapping_at(address_of(buffer))["AnonHugePages"]
            dirty = private_dirty()
            for i in range(writes):
                buffer[i * HPAGE + 5] = 7
            os.write(reply[1], f"{shared} {private_dirty() - dirty}".encode())

        pid = fork(child)
        try:
            ready, _, _ = select.select([reply[0]], [], [], 30)
            assert ready
            shared, grown = (int(x) for x in os.read(reply[0], 100).split())
        finally:
            reap(pid)
            os.close(reply[0])
            os.close(reply[1])
        return shared, grown

    shared, grown = in_child(body)[0]
    assert shared >= 62 * MIB, "the child did not inherit huge pages"
    # 2 MiB copies would make it 64 MiB; 4 KiB copies make it ~130 KiB plus Python's own.
    assert grown < writes * HPAGE // 4, f"{writes} writes grew Private_Dirty by {grown}"


def private_dirty() -> int:
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Private_Dirty in /proc/self/smaps_rollup")


@needs_thp
@needs_collapse
def test_untouched_ranges_are_refused_counted_and_left_unfilled() -> None:
    """A 2 MiB range never touched has no page table: the kernel refuses it (EINVAL), the
    report counts it, the rest is collapsed, and the empty range does not become resident."""

    def body() -> tuple[Any, dict[str, Any], dict[str, Any]]:
        area, first = private_map(18 * MIB)
        area[first:first + 12 * MIB:PAGE] = b"\x01" * (12 * MIB // PAGE)
        where = address_of(area) + first
        before = mapping_at(where)
        report = collapse_hugepages()
        after = mapping_at(where)
        area.close()
        return report, before, after

    (report, before, after), seen = in_child(body)
    assert seen == []
    assert report.failures.get("EINVAL", 0) >= 2
    assert after["AnonHugePages"] >= 12 * MIB
    assert after["Rss"] - before["Rss"] < 4 * MIB, "the untouched ranges were filled"
    assert "EINVAL x" in report.summary()


@pytest.mark.skipif(MODE != "madvise", reason=f"THP is {MODE!r}: only in 'madvise' mode does "
                    "a first touch fault in 4 KiB and leave a mapping sparse")
def test_sparse_mappings_are_left_alone() -> None:
    def body() -> tuple[Any, dict[str, Any], dict[str, Any]]:
        area, first = private_map(66 * MIB)
        area[first::HPAGE] = b"\x01" * len(range(first, 66 * MIB, HPAGE))  # 1 page per 2 MiB
        where = address_of(area) + first
        before = mapping_at(where)
        report = collapse_hugepages()
        after = mapping_at(where)
        area.close()
        return report, before, after

    (report, before, after), _ = in_child(body)
    assert report.skipped_regions >= 1
    assert "hg" not in after["VmFlags"]
    assert after["Rss"] == before["Rss"] < 4 * MIB


# -- fallbacks ----------------------------------------------------------------------------


def fake_thp_dir(tmp: Path, enabled: str | None) -> str:
    """A directory laid out like /sys/kernel/mm/transparent_hugepage (real files)."""
    (tmp / "hpage_pmd_size").write_text(f"{HPAGE}\n")
    if enabled is not None:
        (tmp / "enabled").write_text(enabled + "\n")
    return str(tmp)


@pytest.mark.parametrize(("enabled", "mode", "words"), [
    ("always madvise [never]", "never", "'never'"),
    (None, "unavailable", "no transparent huge pages"),
])
def test_thp_off_does_nothing_and_warns(tmp_path: Path, enabled: str | None, mode: str,
                                        words: str) -> None:
    thp_dir = fake_thp_dir(tmp_path, enabled)

    def body() -> tuple[Any, dict[str, Any], dict[str, Any]]:
        buffer = touched(64 * MIB)
        before = mapping_at(address_of(buffer))
        report = hugepages._collapse(None, 0.5, thp_dir=thp_dir)
        return report, before, mapping_at(address_of(buffer))

    (report, before, after), seen = in_child(body)
    messages = huge_warnings(seen)
    assert len(messages) == 1 and words in messages[0] and "nothing done" in messages[0]
    assert (report.mode, report.regions, report.collapse) == (mode, 0, False)
    assert report.huge_after == report.huge_before
    assert words in (report.fallback or "")
    assert report.summary().startswith(f"huge pages (THP {mode}): nothing done")
    assert "hg" not in after["VmFlags"]
    assert after["AnonHugePages"] == before["AnonHugePages"]


@needs_thp
def test_without_madv_collapse_only_madv_hugepage_is_applied() -> None:
    # The kernel's answer to an advice it does not know (EINVAL) is what a kernel before
    # 6.1 gives for MADV_COLLAPSE: make sure this kernel does refuse the stand-in.
    assert not hugepages.collapse_supported(UNKNOWN_ADVICE)

    def body() -> tuple[Any, dict[str, Any]]:
        buffer = touched(64 * MIB)
        report = hugepages._collapse(None, 0.5, collapse_advice=UNKNOWN_ADVICE)
        return report, mapping_at(address_of(buffer))

    (report, after), seen = in_child(body)
    messages = huge_warnings(seen)
    assert len(messages) == 1, messages  # once per call, not once per mapping
    assert "MADV_COLLAPSE is not supported" in messages[0]
    assert "MADV_HUGEPAGE alone" in messages[0] and "khugepaged" in messages[0]
    assert report.collapse is False and report.regions >= 1 and report.bytes_huge == 0
    assert report.bytes_advised >= 62 * MIB
    assert "hg" in after["VmFlags"]
    assert "MADV_HUGEPAGE only" in report.summary()


@needs_thp
@needs_collapse
def test_thp_disabled_for_the_process_does_nothing_and_warns() -> None:
    def body() -> tuple[Any, dict[str, Any], int | None]:
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE, for this child only
        buffer = touched(64 * MIB)
        report = collapse_hugepages()
        where = mapping_at(address_of(buffer))
        # The kernel itself now refuses a collapse here: the fallback matches reality.
        refused = hugepages._madvise(where["start"], where["end"] - where["start"],
                                     hugepages.MADV_COLLAPSE)
        return report, where, refused

    (report, where, refused), seen = in_child(body)
    messages = huge_warnings(seen)
    assert len(messages) == 1 and "disabled for this process" in messages[0]
    assert report.regions == 0 and report.collapse is False
    assert "hg" not in where["VmFlags"]
    assert refused == errno.EINVAL


# -- arguments and impossible environments -------------------------------------------------


@pytest.mark.parametrize("options", [
    {"min_region": -1}, {"min_region": True}, {"min_region": 1.5},
    {"min_resident": 1.5}, {"min_resident": -0.1}, {"min_resident": "half"},
])
def test_bad_arguments_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        collapse_hugepages(**options)


def test_no_proc_is_a_clear_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "smaps")
    with pytest.raises(ObjectNotFoundError, match="needs Linux with /proc mounted") as info:
        hugepages._collapse(None, 0.5, smaps=missing)
    assert info.value.obj == missing
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_warning_class_is_a_runtime_warning() -> None:
    assert issubclass(HugepageWarning, RuntimeWarning)
    assert HugepageWarning.__doc__
