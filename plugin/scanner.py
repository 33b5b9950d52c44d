"""Guest RAM scanning for a domain's fusion worker, over the native core.

This is the only module that talks to ``pagefusion._native``: it checks every
argument before C sees it and turns the core's negative errno returns into
pagefusion exceptions.  The core (native/pfcore.h) reads a QEMU process's
guest RAM read-only through ``/proc/PID/mem``, fingerprints each page with a
keyed hash and classifies it as zero, volatile, duplicate or unique, so that
the daemon can pace KSM by how much would really merge.

Guest RAM is what QEMU marked mergeable: the areas whose ``VmFlags`` in
``/proc/PID/smaps`` carry ``mg``.  They are read again at every pass, as RAM
can be hot-plugged and the process can exit at any time.
"""

from __future__ import annotations

import array
import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Final

from pagefusion._native import ffi, lib
from pagefusion.errors import DomainGoneError, HostError, NativeError, PagefusionError

log = logging.getLogger(__name__)

PAGE_SIZE: Final[int] = lib.PF_PAGE_SIZE
KEY_SIZE: Final[int] = lib.PF_KEY_SIZE
FP_ZERO: Final[int] = lib.PF_FP_ZERO
EXPORT_MAGIC: Final[int] = lib.PF_EXPORT_MAGIC
EXPORT_VERSION: Final[int] = lib.PF_EXPORT_VERSION
EXPORT_HEADER_SIZE: Final[int] = lib.PF_EXPORT_HEADER_SIZE

_HEX_DIGITS = frozenset("0123456789abcdef")
_MERGEABLE_FLAG = "mg"


class ScanInputError(PagefusionError, ValueError):
    """An argument handed to the scanner is not usable (wrong size, type or range)."""


@dataclass(frozen=True, slots=True)
class Region:
    """One mergeable area of a guest process: ``length`` bytes from ``start``."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def pages(self) -> int:
        return self.length // PAGE_SIZE


@dataclass(frozen=True, slots=True)
class ScanCounters:
    """What one pass saw, in pages unless the name says otherwise.

    The scanned pages split into exactly one of volatile, zero, duplicate and
    unique (tested in that order):

    - ``pages_volatile``: seen before, and the fingerprint changed since;
    - ``pages_zero``: all bytes zero;
    - ``pages_duplicate``: the same bytes (compared, not only hashed) as the
      representative page of its contents in this process, or as a page of a
      loaded foreign set, read from that process;
    - ``pages_unique``: the rest, including each group's representative.

    ``pages_fusible`` counts the duplicate and zero pages that KSM could merge
    now: the page and its copy both kept their fingerprint over two looks a
    pass apart; ``pages_fusible_zero`` is the zero part of it and
    ``pages_foreign`` the duplicates found in another process.  A group of k
    identical stable pages of this domain gives k - 1 fusible pages; all k if
    the contents are also in a foreign set.  ``hash_collisions`` counts
    fingerprint matches whose bytes differed, ``read_errors`` pages of the
    guest that could not be read, ``bytes_read`` every byte copied from any
    process.  ``pages_unread_shared`` counts the pages KSM shares that kept
    their class from their last look without being read (see ``pfcore.h``);
    they are part of ``pages_scanned`` and of their class.  ``pages_total``
    is the guest's mergeable size in pages and ``passes_per_cycle`` how many
    passes of the budget cover all of it.
    """

    pages_total: int
    passes_per_cycle: int
    pages_scanned: int
    pages_zero: int
    pages_volatile: int
    pages_duplicate: int
    pages_unique: int
    pages_fusible: int
    pages_fusible_zero: int
    pages_foreign: int
    hash_collisions: int
    read_errors: int
    bytes_read: int
    pages_unread_shared: int


_COUNTER_NAMES: Final[tuple[str, ...]] = tuple(field.name for field in fields(ScanCounters))


# ---------------------------------------------------------------- checks


def _check_pid(pid: object, what: str = "pid") -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise ScanInputError(f"{what} must be a positive int, got {pid!r}")
    return pid


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise ScanInputError(
            f"key must be exactly {KEY_SIZE} bytes, got {type(key).__name__} instead of bytes"
        )
    raw = bytes(key)
    if len(raw) != KEY_SIZE:
        raise ScanInputError(f"key must be exactly {KEY_SIZE} bytes, got {len(raw)} bytes")
    return raw


def _check_positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ScanInputError(f"{what} must be a positive int, got {value!r}")
    return value


def _page_view(buf: object, what: str) -> memoryview:
    """A flat byte view of ``buf``, whose size must be a whole number of pages."""
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise ScanInputError(
            f"{what} must be a bytes-like object, got {type(buf).__name__}"
        ) from None
    if not view.c_contiguous:
        raise ScanInputError(f"{what} must be a contiguous buffer")
    view = view.cast("B")
    if view.nbytes % PAGE_SIZE:
        raise ScanInputError(
            f"{what} must be a multiple of {PAGE_SIZE} bytes, got {view.nbytes} bytes "
            f"({view.nbytes % PAGE_SIZE} bytes past the last whole page)"
        )
    return view


def _raise_for(ret: int, action: str, pid: int | None = None) -> int:
    """Return ``ret`` when it is not a negative errno; raise the matching error."""
    if ret >= 0:
        return ret
    code = -ret
    name = errno.errorcode.get(code, str(code))
    if code == errno.ESRCH and pid is not None:
        raise DomainGoneError(f"process {pid} is gone: {action} failed")
    if code == errno.EPERM and pid is not None:
        raise NativeError(
            f"{action}: not allowed to read the memory of process {pid} "
            "(the worker needs root or CAP_SYS_PTRACE)"
        )
    raise NativeError(f"{action} failed: {name} ({os.strerror(code)})")


# ---------------------------------------------------------------- guest RAM


def _parse_smaps(lines: Iterable[str]) -> list[Region]:
    """Mergeable areas of an smaps listing, adjacent ones joined, in address order."""
    regions: list[Region] = []
    start = end = 0
    for line in lines:
        if line[:1] in _HEX_DIGITS:
            # "7f12a4000000-7f12e4000000 rw-p 00000000 00:00 0": a new area.
            low, _, high = line.split(" ", 1)[0].partition("-")
            start, end = int(low, 16), int(high, 16)
        elif line.startswith("VmFlags:") and _MERGEABLE_FLAG in line.split()[1:]:
            if regions and regions[-1].end == start:
                last = regions.pop()
                regions.append(Region(last.start, end - last.start))
            else:
                regions.append(Region(start, end - start))
    return regions


def guest_ram_regions(pid: int) -> list[Region]:
    """The guest RAM of QEMU process ``pid``: its mergeable areas.

    Raises DomainGoneError when the process is gone (or goes while its map is
    read) and HostError when this process may not read it.
    """
    _check_pid(pid)
    path = f"/proc/{pid}/smaps"
    try:
        with open(path, encoding="ascii", errors="replace") as smaps:
            return _parse_smaps(smaps)
    except (FileNotFoundError, ProcessLookupError):
        raise DomainGoneError(f"process {pid} is gone: {path} could not be read") from None
    except PermissionError:
        raise HostError(f"not allowed to read {path}: run the fusion worker as root") from None


def read_guest_pages(pid: int, address: int, pages: int) -> tuple[bytes, list[bool]]:
    """Copy ``pages`` pages from ``address`` of process ``pid``, read-only.

    Returns the bytes and, per page, whether it could be read; a page that
    could not be (unmapped, no access) reads as zeros.
    """
    _check_pid(pid)
    if isinstance(address, bool) or not isinstance(address, int) or address < 0:
        raise ScanInputError(f"address must be a non-negative int, got {address!r}")
    if address % PAGE_SIZE:
        raise ScanInputError(f"address must be page aligned ({PAGE_SIZE}), got {address:#x}")
    _check_positive(pages, "pages")
    buf = bytearray(pages * PAGE_SIZE)
    ok = bytearray(pages)
    ret = lib.pf_read_pages(
        pid, address, pages, ffi.from_buffer(buf), ffi.from_buffer(ok), ffi.NULL
    )
    _raise_for(ret, f"reading {pages} pages at {address:#x}", pid)
    return bytes(buf), [bool(flag) for flag in ok]


# ---------------------------------------------------------------- fingerprints


def fingerprint_buffer(key: bytes, buf: object) -> array.array[int]:
    """Fingerprints of the consecutive pages of ``buf`` under ``key``.

    An all-zero page gets FP_ZERO (0); no other page does.
    """
    raw_key = _check_key(key)
    view = _page_view(buf, "buffer")
    pages = view.nbytes // PAGE_SIZE
    fps = array.array("Q", bytes(8 * pages))
    if pages:
        ret = lib.pf_fingerprint_pages(
            ffi.from_buffer(raw_key),
            ffi.from_buffer(view),
            pages,
            ffi.from_buffer("uint64_t[]", fps),
        )
        _raise_for(ret, "fingerprinting")
    return fps


def page_is_zero(page: object) -> bool:
    """Whether one page (exactly PAGE_SIZE bytes) is all zero."""
    view = _page_view(page, "page")
    if view.nbytes != PAGE_SIZE:
        raise ScanInputError(f"page must be exactly {PAGE_SIZE} bytes, got {view.nbytes} bytes")
    return bool(lib.pf_page_is_zero(ffi.from_buffer(view)))


def count_zero_mappings(
    entries: array.array[int], zero_pfn: int, huge_zero_pfn: int, nr_huge_zero: int
) -> int:
    """How many present pagemap ``entries`` map the zero page or the huge zero page."""
    if not isinstance(entries, array.array) or entries.typecode != "Q":
        raise ScanInputError("pagemap entries must be an array.array of type 'Q'")
    for name, value in (("zero_pfn", zero_pfn), ("huge_zero_pfn", huge_zero_pfn),
                        ("nr_huge_zero", nr_huge_zero)):  # fmt: skip
        if not isinstance(value, int) or value < 0:
            raise ScanInputError(f"{name} must be a non-negative int, got {value!r}")
    if not entries:
        return 0
    return int(
        lib.pf_count_zero_mappings(
            ffi.from_buffer("uint64_t[]", entries), len(entries), zero_pfn, huge_zero_pfn,
            nr_huge_zero,
        )
    )  # fmt: skip


# ---------------------------------------------------------------- scanner


class PageScanner:
    """Scans the guest RAM of one QEMU process, a budget of pages per pass.

    Successive passes rotate over the guest so that ``passes_per_cycle``
    passes look at every page once.  Not thread safe: one worker thread owns
    a scanner.  The C calls release the GIL.
    """

    def __init__(self, pid: int, key: bytes, *, pages_per_pass: int) -> None:
        self._pid = _check_pid(pid)
        raw_key = _check_key(key)
        budget = _check_positive(pages_per_pass, "pages_per_pass")
        handle = ffi.new("struct pf_scanner **")
        ret = lib.pf_scanner_new(self._pid, ffi.from_buffer(raw_key), budget, handle)
        _raise_for(ret, "creating a scanner")
        self._scanner = ffi.gc(handle[0], lib.pf_scanner_free)
        self._regions: tuple[Region, ...] = ()
        self._closed = False
        log.debug("scanner for pid %d: %d pages per pass", self._pid, budget)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def regions(self) -> tuple[Region, ...]:
        """The guest RAM areas found at the start of the last pass."""
        return self._regions

    @property
    def memory_bytes(self) -> int:
        """Memory the native scanner holds, foreign sets included."""
        return int(lib.pf_scanner_memory_bytes(self._live()))

    def _live(self) -> object:
        if self._closed:
            raise ScanInputError(f"the scanner of process {self._pid} is closed")
        return self._scanner

    def _set_regions(self, regions: list[Region]) -> None:
        native = ffi.new("struct pf_region[]", max(len(regions), 1))
        for slot, region in zip(native, regions, strict=False):
            slot.start = region.start
            slot.nr_pages = region.pages
        ret = lib.pf_scanner_set_regions(self._live(), native, len(regions))
        _raise_for(ret, f"setting the {len(regions)} guest RAM areas", self._pid)
        log.debug(
            "pid %d guest RAM now %d areas, %d pages",
            self._pid,
            len(regions),
            sum(region.pages for region in regions),
        )
        self._regions = tuple(regions)

    def scan_pass(self) -> ScanCounters:
        """Scan one pass; DomainGoneError once the process has exited."""
        scanner = self._live()
        regions = guest_ram_regions(self._pid)
        if tuple(regions) != self._regions:
            self._set_regions(regions)
        loaded = self.foreign_pids()
        counters = ffi.new("struct pf_counters *")
        _raise_for(lib.pf_scanner_pass(scanner, counters), "scanning guest RAM", self._pid)
        dropped = set(loaded) - set(self.foreign_pids())
        if dropped:
            log.info(
                "pid %d: dropped the fingerprint sets of %s, no longer readable",
                self._pid,
                sorted(dropped),
            )
        return ScanCounters(**{name: int(getattr(counters, name)) for name in _COUNTER_NAMES})

    def fingerprints(self) -> bytes:
        """This domain's stable page set, to publish to the other workers.

        Little-endian: a 32-byte header (u32 magic ``PFFP``, u16 version, u16
        header size, u32 region count, u32 entry count, u64 key id, u64 page
        count), the regions as (u64 start, u64 pages), the entries'
        fingerprints as u64 in ascending order, then their u32 page indices
        in the regions' page space.  One entry per distinct stable non-zero
        page content.  Only a scanner with the same key accepts it.
        """
        scanner = self._live()
        size = _raise_for(lib.pf_scanner_export(scanner, ffi.NULL, 0), "sizing the export")
        buf = bytearray(size)
        written = lib.pf_scanner_export(scanner, ffi.from_buffer(buf), size)
        _raise_for(written, "exporting fingerprints")
        return bytes(buf)

    def load_foreign(self, pid: int, data: object) -> None:
        """Use the set ``data`` another worker published for QEMU process ``pid``.

        Replaces an earlier set of the same pid.  Its pages are read from
        ``pid`` to confirm duplicates; the set is dropped once that fails.
        """
        foreign_pid = _check_pid(pid)
        if foreign_pid == self._pid:
            raise ScanInputError(
                f"pid {pid} is the scanner's own process: its pages are compared already"
            )
        try:
            view = memoryview(data).cast("B")  # type: ignore[arg-type]
        except TypeError:
            raise ScanInputError(
                f"fingerprint set of pid {pid} must be bytes-like, got {type(data).__name__}"
            ) from None
        if view.nbytes < EXPORT_HEADER_SIZE or view[:4].tobytes() != b"PFFP":
            raise ScanInputError(
                f"fingerprint set of pid {pid} is not a pagefusion set "
                f"({view.nbytes} bytes, no PFFP header)"
            )
        ret = lib.pf_scanner_load_foreign(
            self._live(), foreign_pid, ffi.from_buffer(view), view.nbytes
        )
        if ret == -errno.EKEYREJECTED:
            raise NativeError(
                f"fingerprint set of pid {pid} was made with another key: "
                "all workers of a host must share the boot key"
            )
        if ret == -errno.EINVAL:
            raise NativeError(f"fingerprint set of pid {pid} is malformed ({view.nbytes} bytes)")
        _raise_for(ret, f"loading the fingerprint set of pid {pid}")
        log.debug("pid %d: loaded the fingerprint set of pid %d", self._pid, foreign_pid)

    def drop_foreign(self, pid: int) -> bool:
        """Forget the set of ``pid``; False if none was loaded."""
        ret = lib.pf_scanner_drop_foreign(self._live(), _check_pid(pid))
        return ret == 0

    def foreign_pids(self) -> list[int]:
        """Pids whose published sets are loaded."""
        scanner = self._live()
        count = int(lib.pf_scanner_foreign_pids(scanner, ffi.NULL, 0))
        if not count:
            return []
        pids = ffi.new("int[]", count)
        lib.pf_scanner_foreign_pids(scanner, pids, count)
        return list(pids)

    def close(self) -> None:
        """Free the native scanner now; later calls raise ScanInputError."""
        if not self._closed:
            self._closed = True
            ffi.release(self._scanner)

    def __enter__(self) -> PageScanner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
