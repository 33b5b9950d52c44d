"""Finding and reading guest RAM, against child processes that stand in for QEMU.

A child maps anonymous private memory, marks it mergeable the way QEMU marks
guest RAM (so smaps lists it with ``mg``), fills its pages from seeds and
answers JSON commands on stdin.  No libvirt, no root needed beyond what
reading /proc/PID/mem of one's own child takes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from standin import StandIn

from pagefusion import scanner, zeropages
from pagefusion.errors import DomainGoneError, PagefusionError

PAGE = 4096
KEY = bytes(range(100, 116))

CHILD = r"""
import ctypes, json, mmap, random, sys
PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
for name in ("madvise", "mprotect"):
    getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

def fill(addr, seeds):
    for i, seed in enumerate(seeds):
        data = bytes(PAGE) if seed is None else random.Random(seed).randbytes(PAGE)
        ctypes.memmove(addr + i * PAGE, data, PAGE)

for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "map":
        size = len(cmd["seeds"]) * PAGE
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        reply = libc.mmap(None, size, prot, flags, -1, 0)
        if cmd["mergeable"]:
            assert libc.madvise(reply, size, mmap.MADV_MERGEABLE) == 0
        fill(reply, cmd["seeds"])
    elif cmd["op"] == "unmap":
        reply = libc.munmap(cmd["addr"], cmd["pages"] * PAGE)
    elif cmd["op"] == "protect":
        reply = libc.mprotect(cmd["addr"], cmd["pages"] * PAGE, 0)
    print(json.dumps(reply), flush=True)
"""


class Child(StandIn):
    """A stand-in QEMU process driven over a pipe."""

    def __init__(self) -> None:
        super().__init__(CHILD)

    def map(self, seeds: list[int | None], *, mergeable: bool = True) -> int:
        return self.call(op="map", seeds=seeds, mergeable=mergeable)


@pytest.fixture
def child():
    process = Child()
    try:
        yield process
    finally:
        process.stop()


def page_bytes(seed: int | None) -> bytes:
    return bytes(PAGE) if seed is None else random.Random(seed).randbytes(PAGE)


def covering(regions: list[scanner.Region], start: int, length: int) -> bool:
    return any(r.start <= start and start + length <= r.end for r in regions)


def test_mergeable_areas_are_the_guest_ram(child: Child) -> None:
    plain = child.map([1, 2, 3], mergeable=False)
    guest = child.map(list(range(10, 42)))
    regions = scanner.guest_ram_regions(child.pid)
    assert covering(regions, guest, 32 * PAGE)
    assert not any(r.start <= plain < r.end for r in regions)
    assert sum(r.length for r in regions) == 32 * PAGE
    assert all(r.start % PAGE == 0 and r.length % PAGE == 0 for r in regions)


def test_read_pages_copies_the_guest_bytes(child: Child) -> None:
    seeds: list[int | None] = [7, None, 8, 7]
    addr = child.map(seeds)
    data, ok = scanner.read_guest_pages(child.pid, addr, len(seeds))
    assert ok == [True] * 4
    assert data == b"".join(page_bytes(seed) for seed in seeds)


def test_unreadable_page_is_skipped_not_fatal(child: Child) -> None:
    addr = child.map(list(range(20, 28)))
    assert child.call(op="unmap", addr=addr + 3 * PAGE, pages=1) == 0
    assert child.call(op="unmap", addr=addr + 6 * PAGE, pages=1) == 0
    data, ok = scanner.read_guest_pages(child.pid, addr, 8)
    assert ok == [True, True, True, False, True, True, False, True]
    for index, seed in enumerate(range(20, 28)):
        expected = bytes(PAGE) if not ok[index] else page_bytes(seed)
        assert data[index * PAGE : (index + 1) * PAGE] == expected


def test_unmapped_page_splits_the_regions(child: Child) -> None:
    addr = child.map(list(range(30, 40)))
    child.call(op="unmap", addr=addr + 4 * PAGE, pages=1)
    regions = scanner.guest_ram_regions(child.pid)
    assert covering(regions, addr, 4 * PAGE)
    assert covering(regions, addr + 5 * PAGE, 5 * PAGE)
    assert not any(r.start <= addr + 4 * PAGE < r.end for r in regions)


def test_smaps_parsing_joins_adjacent_areas() -> None:
    listing = [
        "7f0000000000-7f0000004000 rw-p 00000000 00:00 0 \n",
        "Size:                 16 kB\n",
        "VmFlags: rd wr mr mw me ac sd mg \n",
        "7f0000004000-7f0000008000 rw-p 00000000 00:00 0 \n",
        "THPeligible:    0\n",
        "VmFlags: rd wr mr mw me ac sd mg \n",
        "7f0000008000-7f0000009000 rw-p 00000000 00:00 0 \n",
        "VmFlags: rd wr mr mw me ac sd \n",
        "7f0000010000-7f0000012000 ---p 00000000 00:00 0 \n",
        "VmFlags: mr mw me ac sd mg \n",
    ]
    assert scanner._parse_smaps(listing) == [
        scanner.Region(0x7F0000000000, 0x8000),
        scanner.Region(0x7F0000010000, 0x2000),
    ]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_dead_pid_is_a_domain_gone_error() -> None:
    pid = dead_pid()
    with pytest.raises(DomainGoneError, match=f"process {pid} is gone"):
        scanner.guest_ram_regions(pid)
    with pytest.raises(DomainGoneError, match=str(pid)):
        scanner.read_guest_pages(pid, 0x10000, 1)
    with scanner.PageScanner(pid, KEY, pages_per_pass=64) as pages:
        with pytest.raises(DomainGoneError, match=str(pid)):
            pages.scan_pass()


def test_process_exit_between_passes(child: Child) -> None:
    child.map(list(range(50, 60)))
    with scanner.PageScanner(child.pid, KEY, pages_per_pass=64) as pages:
        assert pages.scan_pass().pages_scanned == 10
        pid = child.pid
        child.stop()
        with pytest.raises(DomainGoneError, match=f"process {pid} is gone"):
            pages.scan_pass()


def test_process_exit_before_the_zero_page_count(child: Child) -> None:
    if not zeropages.zero_pages().zero_pfn:
        pytest.skip("the zero page's frame number is shown to root only")
    child.map(list(range(50, 60)))
    regions = scanner.guest_ram_regions(child.pid)
    assert zeropages.count_mappings(child.pid, regions) >= 0
    pid = child.pid
    child.stop()
    with pytest.raises(DomainGoneError, match=f"process {pid} is gone"):
        zeropages.count_mappings(pid, regions)


@pytest.mark.parametrize("pid", [0, -4, True, "123", 1.5])
def test_bad_pid_is_refused(pid: object) -> None:
    with pytest.raises(PagefusionError, match="pid must be a positive int"):
        scanner.guest_ram_regions(pid)  # type: ignore[arg-type]
    with pytest.raises(PagefusionError, match="pid must be a positive int"):
        scanner.PageScanner(pid, KEY, pages_per_pass=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("budget", [0, -1, True, 2.0])
def test_bad_budget_is_refused(budget: object) -> None:
    with pytest.raises(PagefusionError, match="pages_per_pass must be a positive int"):
        scanner.PageScanner(os.getpid(), KEY, pages_per_pass=budget)  # type: ignore[arg-type]


def test_scanner_key_is_checked() -> None:
    with pytest.raises(PagefusionError, match="exactly 16 bytes, got 8 bytes"):
        scanner.PageScanner(os.getpid(), bytes(8), pages_per_pass=1)


def test_read_address_must_be_page_aligned() -> None:
    with pytest.raises(PagefusionError, match="page aligned"):
        scanner.read_guest_pages(os.getpid(), 0x1001, 1)


def test_closed_scanner_refuses_work() -> None:
    pages = scanner.PageScanner(os.getpid(), KEY, pages_per_pass=1)
    pages.close()
    pages.close()
    with pytest.raises(PagefusionError, match="closed"):
        pages.scan_pass()
