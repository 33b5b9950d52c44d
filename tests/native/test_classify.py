"""Page classification across passes and across domains, with exact counts.

Child processes stand in for QEMU: each maps anonymous private memory marked
mergeable (smaps shows ``mg``) and fills it with pages from seeds: ``None``
is a zero page, equal seeds give identical pages, fresh seeds unique ones.
The tests rewrite pages between passes through the child, so every count is
known in advance.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator

import pytest
from standin import StandIn

from pagefusion import scanner
from pagefusion.errors import NativeError, PagefusionError

PAGE = 4096
KEY = bytes.fromhex("00112233445566778899aabbccddeeff")

CHILD = r"""
import ctypes, json, mmap, random, sys
PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

def write(addr, seed):
    data = bytes(PAGE) if seed is None else random.Random(seed).randbytes(PAGE)
    ctypes.memmove(addr, data, PAGE)

for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "map":
        size = cmd["pages"] * PAGE
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        reply = libc.mmap(None, size, prot, flags, -1, 0)
        assert libc.madvise(reply, size, mmap.MADV_MERGEABLE) == 0
    elif cmd["op"] == "write":
        for addr, seed in cmd["pages"]:
            write(addr, seed)
        reply = len(cmd["pages"])
    elif cmd["op"] == "unmap":
        reply = libc.munmap(cmd["addr"], PAGE)
    print(json.dumps(reply), flush=True)
"""


class Child(StandIn):
    """A stand-in QEMU process driven over a pipe."""

    def __init__(self) -> None:
        super().__init__(CHILD)

    def map(self, seeds: list[int | None]) -> int:
        """Map len(seeds) mergeable pages, fill them, return the address."""
        addr = self.call(op="map", pages=len(seeds))
        self.write(addr, dict(enumerate(seeds)))
        return addr

    def write(self, addr: int, seeds: dict[int, int | None]) -> None:
        pairs = [[addr + index * PAGE, seed] for index, seed in seeds.items()]
        assert self.call(op="write", pages=pairs) == len(pairs)


@pytest.fixture
def spawn() -> Iterator:
    children: list[Child] = []

    def start() -> Child:
        children.append(Child())
        return children[-1]

    try:
        yield start
    finally:
        for child in children:
            child.stop()


class Layout:
    """Z zero pages, G groups of C identical pages, U unique, V to be rewritten."""

    def __init__(self, zero=100, groups=50, copies=3, unique=200, volatile=30, shuffle=3):
        self.zero, self.groups, self.copies = zero, groups, copies
        self.unique, self.volatile = unique, volatile
        seeds: list[tuple[str, int | None]] = [("zero", None)] * zero
        seeds += [("group", 1000 + g) for g in range(groups) for _ in range(copies)]
        seeds += [("unique", 2000 + u) for u in range(unique)]
        seeds += [("volatile", 3000 + v) for v in range(volatile)]
        random.Random(shuffle).shuffle(seeds)
        self.kinds = [kind for kind, _ in seeds]
        self.seeds = [seed for _, seed in seeds]

    @property
    def pages(self) -> int:
        return len(self.seeds)

    @property
    def duplicates(self) -> int:
        return self.groups * (self.copies - 1)

    def indices(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]


def counts(result: scanner.ScanCounters, *names: str) -> dict[str, int]:
    return {name: getattr(result, f"pages_{name}") for name in names}


CLASSES = ("scanned", "zero", "volatile", "duplicate", "unique")
FUSIBLE = ("fusible", "fusible_zero", "foreign")


def test_full_passes_count_exactly(spawn) -> None:
    layout = Layout()
    guest = spawn()
    addr = guest.map(layout.seeds)
    with scanner.PageScanner(guest.pid, KEY, pages_per_pass=layout.pages) as pages:
        first = pages.scan_pass()
        assert first.pages_total == layout.pages
        assert first.passes_per_cycle == 1
        assert counts(first, *CLASSES) == {
            "scanned": layout.pages,
            "zero": layout.zero,
            "volatile": 0,
            "duplicate": layout.duplicates,
            "unique": layout.groups + layout.unique + layout.volatile,
        }
        # Nothing was seen twice yet: KSM would not merge anything either.
        assert counts(first, *FUSIBLE) == {"fusible": 0, "fusible_zero": 0, "foreign": 0}
        assert first.hash_collisions == first.read_errors == 0
        assert first.bytes_read >= layout.pages * PAGE

        guest.write(addr, {i: 5000 + i for i in layout.indices("volatile")})
        second = pages.scan_pass()
        assert counts(second, *CLASSES) == {
            "scanned": layout.pages,
            "zero": layout.zero,
            "volatile": layout.volatile,
            "duplicate": layout.duplicates,
            "unique": layout.groups + layout.unique,
        }
        assert counts(second, *FUSIBLE) == {
            "fusible": layout.duplicates + layout.zero,
            "fusible_zero": layout.zero,
            "foreign": 0,
        }

        third = pages.scan_pass()
        assert third.pages_volatile == 0
        assert third.pages_unique == layout.groups + layout.unique + layout.volatile
        assert third.pages_fusible == layout.duplicates + layout.zero
        assert third.hash_collisions == 0


def test_page_that_becomes_a_copy(spawn) -> None:
    layout = Layout(zero=4, groups=3, copies=2, unique=10, volatile=1)
    guest = spawn()
    addr = guest.map(layout.seeds)
    (moved,) = layout.indices("volatile")
    with scanner.PageScanner(guest.pid, KEY, pages_per_pass=1024) as pages:
        pages.scan_pass()
        pages.scan_pass()
        guest.write(addr, {moved: 1000})  # now a third copy of group 0
        changed = pages.scan_pass()
        assert changed.pages_volatile == 1
        assert changed.pages_duplicate == layout.duplicates
        settled = pages.scan_pass()
        assert settled.pages_volatile == 0
        assert settled.pages_duplicate == layout.duplicates + 1
        assert settled.pages_fusible == layout.duplicates + 1 + layout.zero
        guest.write(addr, {moved: None})  # and then a zero page
        assert pages.scan_pass().pages_volatile == 1
        zeroed = pages.scan_pass()
        assert zeroed.pages_zero == layout.zero + 1
        assert zeroed.pages_fusible_zero == layout.zero + 1


def test_budget_rotates_over_all_pages(spawn) -> None:
    layout = Layout(volatile=0)
    guest = spawn()
    guest.map(layout.seeds)
    budget = 100
    with scanner.PageScanner(guest.pid, KEY, pages_per_pass=budget) as pages:
        first = pages.scan_pass()
        cycle = first.passes_per_cycle
        assert cycle == 5  # 450 pages in runs of 16: 29 runs, 6 runs a pass
        passes = [first] + [pages.scan_pass() for _ in range(cycle - 1)]
        assert all(0 < p.pages_scanned <= budget for p in passes)
        assert sum(p.pages_scanned for p in passes) == layout.pages
        assert sum(p.pages_zero for p in passes) == layout.zero
        assert sum(p.pages_duplicate for p in passes) == layout.duplicates
        assert sum(p.pages_unique for p in passes) == layout.groups + layout.unique
        assert sum(p.pages_fusible for p in passes) == 0

        again = [pages.scan_pass() for _ in range(cycle)]
        assert sum(p.pages_scanned for p in again) == layout.pages
        assert sum(p.pages_volatile for p in again) == 0
        assert sum(p.pages_duplicate for p in again) == layout.duplicates
        assert sum(p.pages_fusible for p in again) == layout.duplicates + layout.zero
        assert sum(p.pages_fusible_zero for p in again) == layout.zero


def test_tiny_budget_still_covers_everything(spawn) -> None:
    guest = spawn()
    guest.map([None, 1, 1, 2, 3, None, 4])
    with scanner.PageScanner(guest.pid, KEY, pages_per_pass=3) as pages:
        passes = [pages.scan_pass() for _ in range(3)]
        assert [p.pages_scanned for p in passes] == [3, 3, 1]
        assert sum(p.pages_duplicate for p in passes) == 1
        assert sum(p.pages_zero for p in passes) == 2


def parse_export(blob: bytes) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    magic, version, size, nr_regions, nr_entries, _, nr_pages = struct.unpack_from("<IHHIIQQ", blob)
    assert (magic, version, size) == (0x50464650, 1, 32)
    assert len(blob) == 32 + 16 * nr_regions + 12 * nr_entries
    regions = [struct.unpack_from("<QQ", blob, 32 + 16 * r) for r in range(nr_regions)]
    assert sum(length for _, length in regions) == nr_pages
    at = 32 + 16 * nr_regions
    fps = list(struct.unpack_from(f"<{nr_entries}Q", blob, at))
    indices = list(struct.unpack_from(f"<{nr_entries}I", blob, at + 8 * nr_entries))
    return regions, fps, indices


def test_export_lists_each_stable_content_once(spawn) -> None:
    layout = Layout(volatile=0)
    guest = spawn()
    addr = guest.map(layout.seeds)
    with scanner.PageScanner(guest.pid, KEY, pages_per_pass=layout.pages) as pages:
        pages.scan_pass()
        assert parse_export(pages.fingerprints())[1] == []  # nothing stable yet
        pages.scan_pass()
        regions, fps, indices = parse_export(pages.fingerprints())
    assert regions == [(addr, layout.pages)]
    assert fps == sorted(set(fps))
    assert len(fps) == layout.groups + layout.unique
    data, _ = scanner.read_guest_pages(guest.pid, addr, layout.pages)
    for fp, index in zip(fps, indices, strict=True):
        page = data[index * PAGE : (index + 1) * PAGE]
        assert scanner.fingerprint_buffer(KEY, page)[0] == fp


def test_duplicates_across_domains(spawn) -> None:
    layout = Layout(volatile=0)
    # The domain with the lower pid keeps its copies; the other one's fuse.
    other, one = sorted((spawn(), spawn()), key=lambda guest: guest.pid)
    one.map(layout.seeds)
    other_addr = other.map(layout.seeds)
    budget = layout.pages
    with (
        scanner.PageScanner(one.pid, KEY, pages_per_pass=budget) as first,
        scanner.PageScanner(other.pid, KEY, pages_per_pass=budget) as second,
    ):
        for _ in range(2):
            first.scan_pass()
            second.scan_pass()
        first.load_foreign(other.pid, second.fingerprints())
        assert first.foreign_pids() == [other.pid]

        shared = first.scan_pass()
        nonzero = layout.groups * layout.copies + layout.unique
        assert counts(shared, "duplicate", "unique", "foreign") == {
            "duplicate": nonzero,
            "unique": 0,
            "foreign": layout.groups + layout.unique,
        }
        assert shared.pages_fusible == nonzero + layout.zero

        # The other domain changes ten of its pages: fingerprints published
        # before no longer match its bytes, and the compare catches it.
        changed = layout.indices("unique")[:10]
        other.write(other_addr, {i: 9000 + i for i in changed})
        stale = first.scan_pass()
        assert stale.pages_foreign == layout.groups + layout.unique - 10
        assert stale.pages_unique == 10
        assert stale.hash_collisions == 0

        # The keeper (lower pid) counts none of its pages as fusible into
        # the other's: summed over both domains, the saving is exact.
        second.load_foreign(one.pid, first.fingerprints())
        keeper = second.scan_pass()
        assert keeper.pages_foreign == 0
        assert keeper.pages_duplicate == layout.duplicates

        # Once that domain is gone its set is dropped, without an error.
        other.stop()
        alone = first.scan_pass()
        assert first.foreign_pids() == []
        assert alone.pages_duplicate == layout.duplicates
        assert alone.pages_unique == layout.groups + layout.unique


def test_foreign_set_checks(spawn) -> None:
    one, other = spawn(), spawn()
    one.map([1, 2, None])
    other.map([1, 3])
    with (
        scanner.PageScanner(one.pid, KEY, pages_per_pass=8) as first,
        scanner.PageScanner(other.pid, KEY[::-1], pages_per_pass=8) as second,
    ):
        first.scan_pass()
        first.scan_pass()
        second.scan_pass()
        second.scan_pass()
        own = first.fingerprints()
        with pytest.raises(PagefusionError, match="own process"):
            first.load_foreign(one.pid, own)
        with pytest.raises(PagefusionError, match="not a pagefusion set"):
            first.load_foreign(other.pid, b"hello")
        with pytest.raises(NativeError, match="another key"):
            first.load_foreign(other.pid, second.fingerprints())
        with pytest.raises(NativeError, match="malformed"):
            first.load_foreign(other.pid, own[:-1])
        assert first.foreign_pids() == []
        first.load_foreign(other.pid, own)  # well-formed: accepted as is
        assert first.foreign_pids() == [other.pid]
        assert first.drop_foreign(other.pid)
        assert not first.drop_foreign(other.pid)


def test_guest_ram_growing_and_shrinking(spawn) -> None:
    guest = spawn()
    guest.map([None, 1, 1, 2])
    with scanner.PageScanner(guest.pid, KEY, pages_per_pass=64) as pages:
        pages.scan_pass()
        guest.map([1, 5, None])  # hot-plugged RAM with one more copy
        grown = pages.scan_pass()
        assert grown.pages_total == 7
        assert grown.pages_volatile == 0  # the old pages kept their history
        assert grown.pages_duplicate == 2
        assert grown.pages_fusible == 2  # the old copy and zero page
        settled = pages.scan_pass()
        assert settled.pages_fusible == 2 + 2


def test_unreadable_page_counts_as_read_error(spawn, monkeypatch) -> None:
    guest = spawn()
    addr = guest.map([1, 2, 3, 4])
    with scanner.PageScanner(guest.pid, KEY, pages_per_pass=64) as pages:
        pages.scan_pass()
        # A page unmapped between reading smaps and reading the pages: the
        # pass still covers the four pages smaps listed.
        assert guest.call(op="unmap", addr=addr + PAGE) == 0
        listed = [scanner.Region(addr, 4 * PAGE)]
        monkeypatch.setattr(scanner, "guest_ram_regions", lambda pid: listed)
        result = pages.scan_pass()
        assert result.pages_total == 4
        assert result.read_errors == 1
        assert result.pages_scanned == 3


def test_memory_stays_within_budget(spawn) -> None:
    guest = spawn()
    gib_pages = (1 << 30) // PAGE
    guest.call(op="map", pages=gib_pages)  # untouched: reads as zero, costs no RAM
    with scanner.PageScanner(guest.pid, KEY, pages_per_pass=256) as pages:
        result = pages.scan_pass()
        assert result.pages_total == gib_pages
        assert result.pages_zero == 256
        per_gib_limit = 24 * 2**20 + 4 * 2**20
        assert pages.memory_bytes <= per_gib_limit
        fixed = scanner.PageScanner(os.getpid(), KEY, pages_per_pass=1)
        try:
            per_page = (pages.memory_bytes - fixed.memory_bytes) / gib_pages
        finally:
            fixed.close()
        assert per_page <= 16


def test_random_churn_settles_to_exact_counts(spawn) -> None:
    """Heavy rewriting across passes, then exact steady-state counts.

    Once nothing changes, every content with n copies gives n - 1 duplicates
    and one unique page, whatever happened to the index before: this checks
    that representatives, takeovers and index deletions stay consistent.
    """
    rng = random.Random(42)
    pages = 3000
    pool: list[int | None] = [None] * 40 + list(range(10_000, 12_500))
    seeds = [rng.choice(pool) for _ in range(pages)]
    guest = spawn()
    addr = guest.map(seeds)
    with (
        scanner.PageScanner(guest.pid, KEY, pages_per_pass=pages) as full,
        scanner.PageScanner(guest.pid, KEY, pages_per_pass=700) as sampled,
    ):
        for round_ in range(6):
            full.scan_pass()
            sampled.scan_pass()
            sampled.scan_pass()
            fresh = 20_000 + 1000 * round_
            churn = {
                index: rng.choice([*pool[-300:], None, fresh + index])
                for index in rng.sample(range(pages), 900)
            }
            guest.write(addr, churn)
            for index, seed in churn.items():
                seeds[index] = seed

        zero = seeds.count(None)
        distinct = len({seed for seed in seeds if seed is not None})
        duplicates = pages - zero - distinct
        full.scan_pass()
        steady = full.scan_pass()
        assert counts(steady, *CLASSES, "fusible", "fusible_zero") == {
            "scanned": pages,
            "zero": zero,
            "volatile": 0,
            "duplicate": duplicates,
            "unique": distinct,
            "fusible": duplicates + zero,
            "fusible_zero": zero,
        }
        assert steady.hash_collisions == 0

        cycle = sampled.scan_pass().passes_per_cycle
        for _ in range(cycle - 1):
            sampled.scan_pass()
        again = [sampled.scan_pass() for _ in range(cycle)]
        assert sum(p.pages_scanned for p in again) == pages
        assert sum(p.pages_volatile for p in again) == 0
        assert sum(p.pages_duplicate for p in again) == duplicates
        assert sum(p.pages_unique for p in again) == distinct
        assert sum(p.pages_fusible for p in again) == duplicates + zero

        for scanned in (full, sampled):
            _, fps, _ = parse_export(scanned.fingerprints())
            assert fps == sorted(set(fps))
            assert len(fps) == distinct


def test_pages_mapped_shared_and_unchanged_are_counted_without_reading(spawn) -> None:
    # Mapped but never written: reading maps the kernel's zero page, present
    # and not exclusive to the process, as a page KSM merged would be.
    child = spawn()
    addr = child.call(op="map", pages=64)
    with scanner.PageScanner(child.pid, KEY, pages_per_pass=4096) as pages:
        first, second, third = (pages.scan_pass() for _ in range(3))
        # The first cycle reads everything; the second finds the pages stable.
        assert first.pages_unread_shared == second.pages_unread_shared == 0
        assert second.bytes_read >= 64 * PAGE
        assert third.pages_unread_shared == 64
        assert third.bytes_read == 0
        for name in ("pages_scanned", "pages_zero", "pages_fusible", "pages_fusible_zero"):
            assert getattr(third, name) == getattr(second, name) == 64, name

        # A write gives the page a private copy, exclusive to the process: read again.
        child.write(addr, {5: 7})
        fourth = pages.scan_pass()
        assert fourth.pages_unread_shared == 63
        assert fourth.pages_volatile == 1
        assert fourth.bytes_read == PAGE
        assert fourth.pages_zero == fourth.pages_fusible == 63

        # Every PF_FULL_READ_CYCLES-th cycle reads every page again.
        later = [pages.scan_pass() for _ in range(scanner.lib.PF_FULL_READ_CYCLES - 3)]
        assert later[-1].pages_unread_shared == 0
        assert later[-1].bytes_read >= 64 * PAGE
        assert all(p.pages_unread_shared == 63 for p in later[:-1])
