"""The kernel's zero pages in a process's memory.

Read faults on untouched anonymous memory map the kernel's zero page (or, in
huge-page areas, its huge zero page). A guest's never-written RAM reads as
zeros but costs nothing and KSM never merges it, so the worker counts such
mappings, through ``/proc/PID/pagemap``, to leave them out of what is fusible.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import functools
import mmap
from dataclasses import dataclass

from pagefusion.errors import DomainGoneError

PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1
HUGE_PAGE_SIZE = 2 << 20


@dataclass(frozen=True)
class ZeroPages:
    """Where the kernel's zero page and huge zero page are (page frame numbers)."""

    zero_pfn: int = 0
    huge_zero_pfn: int = 0
    nr_huge_zero: int = 0

    def covers(self, entry: int) -> bool:
        """Whether a pagemap entry maps one of them."""
        pfn = entry & PAGEMAP_PFN_MASK
        if not entry & PAGEMAP_PRESENT or not pfn:
            return False
        return pfn == self.zero_pfn or 0 <= pfn - self.huge_zero_pfn < self.nr_huge_zero


def _own_pfn(address: int) -> int:
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // mmap.PAGESIZE * 8)
        entry = int.from_bytes(pagemap.read(8), "little")
    return entry & PAGEMAP_PFN_MASK if entry & PAGEMAP_PRESENT else 0


@functools.cache
def zero_pages() -> ZeroPages:
    """Find the zero pages by read-faulting untouched memory of our own.

    Read faults on untouched anonymous memory (a guest's too, when we read
    it) map the kernel's zero page, or in huge-page areas its huge zero
    page: they read as zeros but cost no RAM and KSM never merges them, so
    they must not count as fusible. PFNs are hidden without CAP_SYS_ADMIN:
    then nothing is found and nothing is left out.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    with mmap.mmap(-1, mmap.PAGESIZE, flags=flags) as page:
        page[0]  # fault in the zero page
        zero_pfn = _own_pfn(ctypes.addressof(ctypes.c_char.from_buffer(page)))

    huge_zero_pfn = nr_huge_zero = 0
    with mmap.mmap(-1, 2 * HUGE_PAGE_SIZE, flags=flags) as area:
        start = ctypes.addressof(ctypes.c_char.from_buffer(area))
        offset = -start % HUGE_PAGE_SIZE
        with contextlib.suppress(OSError, AttributeError):
            area.madvise(mmap.MADV_HUGEPAGE, offset, HUGE_PAGE_SIZE)
        area[offset]
        first, second = _own_pfn(start + offset), _own_pfn(start + offset + mmap.PAGESIZE)
        if first and first != zero_pfn and second == first + 1:
            huge_zero_pfn, nr_huge_zero = first, HUGE_PAGE_SIZE // mmap.PAGESIZE
    return ZeroPages(zero_pfn, huge_zero_pfn, nr_huge_zero)


def count_mappings(pid: int, regions) -> int:
    """Pages of the guest RAM that map the zero page or huge zero page (never written)."""
    from pagefusion import scanner

    zeros = zero_pages()
    if not zeros.zero_pfn:
        return 0
    total = 0
    path = f"/proc/{pid}/pagemap"
    try:
        with open(path, "rb", buffering=0) as pagemap:
            for region in regions:
                pagemap.seek(region.start // mmap.PAGESIZE * 8)
                entries = array.array("Q", pagemap.read(region.pages * 8))
                total += scanner.count_zero_mappings(
                    entries, zeros.zero_pfn, zeros.huge_zero_pfn, zeros.nr_huge_zero
                )
    except (FileNotFoundError, ProcessLookupError):
        # QEMU exited between the pass and this look: the worker's work is done.
        raise DomainGoneError(f"process {pid} is gone: {path} could not be read") from None
    return total
