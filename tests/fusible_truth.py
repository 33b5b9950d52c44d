"""The exact fusible memory of running guests, for tests and benchmarks.

Reads every page of every guest twice, a second apart, through
/proc/PID/mem, and counts what KSM could save: among pages that are present,
not a mapping of the kernel's zero page, and unchanged between the two
reads, every copy of a content but one. Slow and memory hungry (it holds a
digest per page), which is why the workers sample instead.
"""

from __future__ import annotations

import array
import collections
import hashlib
import os
import time

from pagefusion import scanner, zeropages

PAGE = 4096


def _snapshot(pid: int) -> dict[int, bytes]:
    zeros = zeropages.zero_pages()
    digests: dict[int, bytes] = {}
    memory = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        for region in scanner.guest_ram_regions(pid):
            data = os.pread(memory, region.length, region.start)
            entries = array.array(
                "Q", os.pread(pagemap, region.pages * 8, region.start // PAGE * 8)
            )
            for i in range(region.pages):
                if not entries[i] & zeropages.PAGEMAP_PRESENT or zeros.covers(entries[i]):
                    continue
                page = data[i * PAGE : (i + 1) * PAGE]
                digests[region.start + i * PAGE] = hashlib.blake2b(page, digest_size=16).digest()
    finally:
        os.close(memory)
        os.close(pagemap)
    return digests


ZERO_DIGEST = hashlib.blake2b(bytes(PAGE), digest_size=16).digest()


def achievable_saving_pages(
    pids: list[int], interval_s: float = 1.0, *, include_zero: bool = True
) -> int:
    """Pages KSM could save across these processes' guest RAM; zero-filled
    pages left out unless ``include_zero``."""
    first = [_snapshot(pid) for pid in pids]
    time.sleep(interval_s)
    second = [_snapshot(pid) for pid in pids]
    copies: collections.Counter[bytes] = collections.Counter()
    for before, after in zip(first, second, strict=True):
        for address, digest in after.items():
            if before.get(address) == digest:
                copies[digest] += 1
    if not include_zero:
        copies.pop(ZERO_DIGEST, None)
    return sum(count - 1 for count in copies.values())
