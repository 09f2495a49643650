"""Transparent huge pages for a big parent that forks often: :func:`collapse_hugepages`.

Why.  ``fork`` copies the parent's page tables, one entry per 4 KiB page, so the time a
fork takes grows with the parent's resident memory.  From a parent holding a 1 GiB
bytearray and 2 million small strings, ForkPool(2) ran 17 tasks/s here, against 334/s from
a small parent.  Mapped by 2 MiB pages the same memory needs 512 times fewer entries (a
huge page is one entry in the level above): after a collapse the same parent ran 176
tasks/s (``benchmarks/bench_pool.py --only 4``, table 4b), and every child still sees all
its data, which ``zygote=True`` cannot give once the data is loaded (19 tasks/s with the
zygote made after the data: the helper is as big as the parent).

What.  Every private anonymous writable mapping of the process (the malloc heap, Python's
arenas, big buffers; no file, no shared memory, not the main stack) at least ``min_region``
long and mostly resident gets ``madvise(MADV_HUGEPAGE)`` (khugepaged may then keep it in
huge pages and re-collapse what a later write splits) and ``madvise(MADV_COLLAPSE)`` (Linux
6.1+: copy it into huge pages now, synchronously).  The bytes do not change, and neither do
copy-on-write semantics: a collapse copies pages inside this process only.

Choices, and why:

* THP ``never`` is the administrator's choice, so nothing is done (with a
  :class:`HugepageWarning`) although MADV_COLLAPSE itself ignores that setting.  Likewise
  when this process has THP disabled by ``prctl(PR_SET_THP_DISABLE)``, or the kernel has
  no THP at all.
* Whether the kernel knows MADV_COLLAPSE is asked with a zero-length call: the kernel
  checks the advice, then returns at once for an empty range.  Unknown (before 6.1):
  MADV_HUGEPAGE alone, and a warning saying khugepaged collapses at its own, slow pace.
* A mapping less than ``min_resident`` resident is left alone: a collapse fills the whole
  2 MiB, and after MADV_HUGEPAGE khugepaged would fill it too (``max_ptes_none`` is 511 by
  default), so advising sparse memory (thread stacks, mostly) would raise RSS.
* MADV_COLLAPSE goes once over each mapping.  When it fails, its errno stands for the worst
  2 MiB range in it, so each range is then asked alone and the refusals are counted by
  errno: a refused range is reported, never raised.

Memory cost, measured here (Linux 6.18, x86-64):

* RSS: a collapse fills every 2 MiB range it makes huge, so untouched 4 KiB pages inside a
  resident range become resident; for densely used memory (Python objects, buffers) the
  growth is small, and the report gives it (``rss_growth``).
* Copy-on-write after a fork copies 4 KiB, not 2 MiB (since Linux 5.8 the first write
  splits the writer's mapping of the huge page and copies the one page): 32 one-byte
  writes in 32 huge pages made a child's Private_Dirty grow by about 300 KiB, as without
  huge pages.  Such a first write costs 15-25 us instead of about 6 us.
* A parent that writes into its huge pages while a child still shares them splits its own
  mapping of each (back to 4 KiB entries, so later forks copy those tables again);
  khugepaged re-collapses them only slowly.  Call :func:`collapse_hugepages` again (it is
  quick over memory already huge), and prefer ``gc.freeze()`` after loading the data so
  that the cyclic collector does not write into every tracked object.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import HugepageWarning, InvalidArgumentError, ObjectNotFoundError

__all__ = [
    "MADV_COLLAPSE",
    "MADV_HUGEPAGE",
    "HugepageReport",
    "collapse_hugepages",
    "collapse_supported",
    "thp_mode",
]

THP_DIR = "/sys/kernel/mm/transparent_hugepage"
SMAPS = "/proc/self/smaps"
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
_PR_GET_THP_DISABLE = 42
_PR_THP_DISABLE_EXCEPT_ADVISED = 2  # the prctl flag that still lets advised memory use THP
_MIB = 1 << 20
_HEX = frozenset("0123456789abcdef")


@functools.cache
def _libc() -> tuple[Callable[..., int], Callable[..., int] | None]:
    """``madvise`` and ``prctl`` (None where libc has none), bound on first use so that
    importing ipcfork never fails on a platform without them."""
    libc = ctypes.CDLL(None, use_errno=True)
    madvise: Any = libc.madvise
    madvise.restype = ctypes.c_int
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    prctl: Any = getattr(libc, "prctl", None)
    if prctl is not None:
        prctl.restype = ctypes.c_int
        prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    return madvise, prctl


def _madvise(start: int, length: int, advice: int) -> int | None:
    """One ``madvise`` call; None on success, else its errno.  ctypes releases the GIL
    around it, so other threads run during a long collapse."""
    madvise, _ = _libc()
    if madvise(start, length, advice) == 0:
        return None
    return ctypes.get_errno()


def _errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))


# -- what the kernel offers ---------------------------------------------------------------


def thp_mode(thp_dir: str = THP_DIR) -> str:
    """The system's THP mode: ``"always"``, ``"madvise"`` or ``"never"`` (the bracketed word
    of ``<thp_dir>/enabled``), or ``"unavailable"`` where the kernel has no THP (no such
    file) or the file cannot be read."""
    try:
        with open(os.path.join(thp_dir, "enabled")) as enabled:
            text = enabled.read()
    except OSError:
        return "unavailable"
    if "[" not in text or "]" not in text:
        return "unavailable"
    return text.split("[", 1)[1].split("]", 1)[0]


def _read_int(path: str) -> int | None:
    try:
        with open(path) as source:
            return int(source.read().strip())
    except (OSError, ValueError):
        return None


def _huge_page_size(thp_dir: str) -> int:
    # Missing before Linux 4.14; 2 MiB is the PMD size of x86-64 and of 4 KiB-page arm64.
    return _read_int(os.path.join(thp_dir, "hpage_pmd_size")) or 2 * _MIB


def collapse_supported(advice: int = MADV_COLLAPSE) -> bool:
    """True if the kernel knows madvise ``advice`` (by default MADV_COLLAPSE, Linux 6.1+).

    A zero-length call: the kernel validates the advice, then returns at once.
    """
    return _madvise(0, 0, advice) is None


def _disabled_by_prctl() -> bool:
    _, prctl = _libc()
    if prctl is None:
        return False
    flags = prctl(_PR_GET_THP_DISABLE, 0, 0, 0, 0)
    # 1: THP off for this process; with EXCEPT_ADVISED set, advised memory may still use it.
    return flags > 0 and not flags & _PR_THP_DISABLE_EXCEPT_ADVISED


def _khugepaged_pace(thp_dir: str) -> str:
    pages = _read_int(os.path.join(thp_dir, "khugepaged", "pages_to_scan"))
    sleep_ms = _read_int(os.path.join(thp_dir, "khugepaged", "scan_sleep_millisecs"))
    if not pages or not sleep_ms:
        return "at its own pace"
    return (f"about {pages * os.sysconf('SC_PAGE_SIZE') / _MIB:,.0f} MiB every "
            f"{sleep_ms / 1000:g} s here")


# -- the process's memory ---------------------------------------------------------------


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    rss: int  # bytes resident
    flags: frozenset[str]  # smaps VmFlags: "hg" advised huge, "nh" advised not huge


@dataclass(frozen=True)
class _Memory:
    private: list[_Mapping]  # private anonymous writable mappings, every size
    rss: int
    anon_huge: int  # bytes of anonymous memory mapped by huge pages


def _read_memory(smaps: str) -> _Memory:
    """Parse ``smaps`` (``/proc/self/smaps``).

    Raises ObjectNotFoundError if it cannot be read: not Linux, or /proc not mounted.
    """
    try:
        with open(smaps) as source:
            lines = source.read().splitlines()
    except OSError as exc:
        raise ObjectNotFoundError(
            f"collapse_hugepages needs Linux with /proc mounted: cannot read {smaps} "
            f"({exc.strerror or exc}; platform {sys.platform})", obj=smaps) from exc
    private: list[_Mapping] = []
    total_rss = total_huge = 0
    header: list[str] | None = None
    rss, flags = 0, frozenset[str]()
    for line in [*lines, "0-0 ---p 0 0:0 0"]:  # a last header flushes the last mapping
        if line[:1] in _HEX:  # "start-end perms offset dev inode [name]"; fields are Capitalised
            if header is not None and header[1] == "rw-p" and header[4] == "0" and (
                    len(header) < 6 or header[5] == "[heap]" or header[5].startswith("[anon:")):
                low, high = (int(edge, 16) for edge in header[0].split("-"))
                private.append(_Mapping(low, high, rss, flags))
            header, rss, flags = line.split(maxsplit=5), 0, frozenset()
        elif line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
            total_rss += rss
        elif line.startswith("AnonHugePages:"):
            total_huge += int(line.split()[1]) * 1024
        elif line.startswith("VmFlags:"):
            flags = frozenset(line.split()[1:])
    return _Memory(private, total_rss, total_huge)


# -- the report -------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / _MIB:,.0f} MiB" if abs(n) >= _MIB or n == 0 else f"{n / 1024:,.0f} KiB"


@dataclass(frozen=True)
class HugepageReport:
    """What :func:`collapse_hugepages` did.  Sizes are in bytes; ``summary()`` says it in
    one line (the pool logs that line)."""

    mode: str
    """THP mode of the system: ``always``, ``madvise``, ``never`` or ``unavailable``."""
    huge_page_size: int
    collapse: bool
    """True if MADV_COLLAPSE was used; False if nothing was done or MADV_HUGEPAGE alone."""
    regions: int
    """Mappings advised (MADV_HUGEPAGE, then MADV_COLLAPSE where supported)."""
    bytes_advised: int
    """Bytes of those mappings inside whole huge pages (what can become huge)."""
    bytes_huge: int
    """Of ``bytes_advised``, bytes in huge pages when the call returned, by the kernel's
    answers (collapsed now or already huge); 0 without MADV_COLLAPSE."""
    huge_before: int
    """AnonHugePages of the whole process (/proc/self/smaps) before and after the call."""
    huge_after: int
    rss_before: int
    """Resident memory of the process (the sum of smaps Rss) before and after the call."""
    rss_after: int
    seconds: float
    skipped_regions: int = 0
    """Mappings of at least ``min_region`` left alone: mostly not resident, or advised
    MADV_NOHUGEPAGE by their owner."""
    # A plain dict so that the report pickles; left out of the hash.
    failures: Mapping[str, int] = field(default_factory=dict, hash=False)
    """Huge pages the kernel refused, by errno name.  EINVAL: not eligible (nothing mapped
    in that range yet, or memory the kernel does not collapse); EAGAIN: a page stayed busy
    (asked twice); ENOMEM: no free 2 MiB block, or the mapping went away meanwhile; EBUSY:
    the memory cgroup would not charge it."""
    fallback: str | None = None
    """What was not done as asked, and why (the text of the warning); None if all was."""

    @property
    def bytes_collapsed(self) -> int:
        """Growth of the process's AnonHugePages over the call (never negative)."""
        return max(0, self.huge_after - self.huge_before)

    @property
    def rss_growth(self) -> int:
        """``rss_after - rss_before``: what filling partly used huge pages cost (plus any
        allocation by other threads meanwhile)."""
        return self.rss_after - self.rss_before

    def summary(self) -> str:
        """One line: what was done, how much, how long, and what fell back."""
        head = f"huge pages (THP {self.mode}):"
        if not self.regions:
            why = self.fallback or "no private mapping large and resident enough"
            return f"{head} nothing done: {why}"
        if self.collapse:
            done = (f"{_size(self.bytes_collapsed)} collapsed, {_size(self.bytes_huge)} of "
                    f"{_size(self.bytes_advised)} advised now huge")
        else:
            done = f"{_size(self.bytes_advised)} advised with MADV_HUGEPAGE only"
        regions = f"{self.regions} region{'s' if self.regions != 1 else ''}"
        line = (f"{head} {done}, {regions}, {self.seconds:.2f} s; process "
                f"AnonHugePages {_size(self.huge_before)} -> {_size(self.huge_after)}, "
                f"RSS {'+' if self.rss_growth >= 0 else '-'}{_size(abs(self.rss_growth))}")
        if self.failures:
            refused = ", ".join(f"{name} x{count}" for name, count in sorted(self.failures.items()))
            line += f"; huge pages refused: {refused}"
        if self.fallback:
            line += f"; {self.fallback}"
        return line


# -- the call ---------------------------------------------------------------------------


def collapse_hugepages(*, min_region: int | None = None,
                       min_resident: float = 0.5) -> HugepageReport:
    """Put this process's large private memory into transparent huge pages, so that
    ``fork`` copies far fewer page-table entries (see the module's notes).

    Call it once after loading the data the children will read, before forking (the pool
    does with ``hugepages=True``).  It took 2.5-5 s per GiB here (the kernel copies the
    memory into new 2 MiB pages; the slower figure on a busy machine); other threads keep
    running meanwhile.  Calling it again is quick over memory that is already huge, and
    restores what later writes have split.

    ``min_region``: mappings shorter than this are left alone (default: two huge pages,
    4 MiB on x86-64).  ``min_resident``: so are mappings with less than this fraction
    resident (default 0.5), since a collapse makes whole 2 MiB ranges resident.

    Returns a :class:`HugepageReport`.  Warns :class:`HugepageWarning` and does nothing if
    THP is ``never``, disabled for this process or absent from the kernel; warns and
    applies MADV_HUGEPAGE alone if the kernel does not know MADV_COLLAPSE; warns if the
    kernel refused every huge page.  A range it refuses is counted in the report.

    Raises ObjectNotFoundError if /proc/self/smaps cannot be read (not Linux, or /proc not
    mounted), InvalidArgumentError for a negative ``min_region`` or a ``min_resident``
    outside 0..1.
    """
    return _collapse(min_region, min_resident)


def _collapse(min_region: int | None, min_resident: float, *, thp_dir: str = THP_DIR,
              smaps: str = SMAPS, collapse_advice: int = MADV_COLLAPSE) -> HugepageReport:
    """:func:`collapse_hugepages` reading THP settings from ``thp_dir`` and the process's
    mappings from ``smaps``, collapsing with madvise advice ``collapse_advice`` (tests point
    these at a file of their own or at an advice the kernel does not know)."""
    began = time.perf_counter()
    if min_region is not None and (isinstance(min_region, bool)
                                   or not isinstance(min_region, int) or min_region < 0):
        raise InvalidArgumentError(f"min_region must be an int >= 0, not {min_region!r}",
                                   limit="min_region >= 0")
    if not isinstance(min_resident, int | float) or not 0.0 <= min_resident <= 1.0:
        raise InvalidArgumentError(f"min_resident must be within 0..1, not {min_resident!r}",
                                   limit="0 <= min_resident <= 1")
    before = _read_memory(smaps)
    mode, hpage = thp_mode(thp_dir), _huge_page_size(thp_dir)

    def report(**facts: Any) -> HugepageReport:
        after = _read_memory(smaps) if facts.get("regions") else before
        fallback = facts.get("fallback")
        if fallback:
            warnings.warn(f"huge pages: {fallback}", HugepageWarning, stacklevel=4)
        return HugepageReport(**{
            "mode": mode, "huge_page_size": hpage, "collapse": False, "regions": 0,
            "bytes_advised": 0, "bytes_huge": 0, "huge_before": before.anon_huge,
            "huge_after": after.anon_huge, "rss_before": before.rss, "rss_after": after.rss,
            "seconds": time.perf_counter() - began, **facts})

    if mode == "unavailable":
        return report(fallback=f"nothing done: this kernel has no transparent huge pages "
                               f"(no readable {os.path.join(thp_dir, 'enabled')})")
    if mode == "never":
        return report(fallback="nothing done: transparent huge pages are 'never' on this "
                               f"machine ({os.path.join(thp_dir, 'enabled')}), forks stay slow")
    if _disabled_by_prctl():
        return report(fallback="nothing done: transparent huge pages are disabled for this "
                               "process (prctl PR_SET_THP_DISABLE), forks stay slow")
    collapse = collapse_supported(collapse_advice)
    smallest = 2 * hpage if min_region is None else min_region
    chosen: list[tuple[_Mapping, int, int]] = []  # (mapping, first huge page, end of last)
    skipped = 0
    for mapping in before.private:
        size = mapping.end - mapping.start
        if size < smallest:
            continue
        low, high = -(-mapping.start // hpage) * hpage, mapping.end // hpage * hpage
        if high <= low:
            continue
        if "nh" in mapping.flags or mapping.rss < min_resident * size:
            skipped += 1
            continue
        chosen.append((mapping, low, high))
    failures: Counter[str] = Counter()
    regions = advised = huge = 0
    for mapping, low, high in chosen:
        # The whole mapping is advised, not only its aligned middle, so the kernel does not
        # split it into three mappings (the flag only matters where a huge page fits).
        err = _madvise(mapping.start, mapping.end - mapping.start, MADV_HUGEPAGE)
        if err is not None:  # the mapping went away (ENOMEM) or cannot take huge pages
            failures[_errno_name(err)] += (high - low) // hpage
            continue
        regions += 1
        advised += high - low
        if collapse:
            huge += _collapse_range(low, high, hpage, collapse_advice, failures) * hpage
    fallback = None
    if not collapse:
        fallback = (f"MADV_COLLAPSE is not supported by this kernel (Linux 6.1+ has it): "
                    f"MADV_HUGEPAGE alone, so khugepaged collapses in the background, "
                    f"{_khugepaged_pace(thp_dir)}, and forks speed up only gradually")
    elif advised and not huge:
        fallback = "the kernel refused every huge page (see the errno counts), forks stay slow"
    return report(collapse=collapse, regions=regions, bytes_advised=advised,
                  bytes_huge=huge, skipped_regions=skipped,
                  failures=dict(failures), fallback=fallback)


def _collapse_range(low: int, high: int, hpage: int, advice: int,
                    failures: Counter[str]) -> int:
    """MADV_COLLAPSE over ``[low, high)`` (huge-page aligned); how many of its huge pages
    are huge afterwards.  Refusals are added to ``failures`` by errno name."""
    if _madvise(low, high - low, advice) is None:
        return (high - low) // hpage
    # The errno of a failed range call stands for its worst 2 MiB range; ask each alone
    # (quick for those the first call collapsed) to count exactly.
    done = 0
    for start in range(low, high, hpage):
        err = _madvise(start, hpage, advice)
        if err == errno.EAGAIN:  # a page was locked or on the move: worth one more try
            err = _madvise(start, hpage, advice)
        if err is None:
            done += 1
        else:
            failures[_errno_name(err)] += 1
    return done
