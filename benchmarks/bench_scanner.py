"""Fingerprinting speed of the native core against memcpy, side by side.

Run: python benchmarks/bench_scanner.py [--mib 256] [--rounds 5]

Both sides work on the same buffer of random pages (so no page takes the
zero-page shortcut), far larger than the caches: memcpy copies it into a
second buffer, the fingerprinter hashes every page.  The best of a few rounds
is reported for each, then the ratio (the target is at least 0.5).  A last
line times a whole scanner pass over the same memory read from a child
process: reading /proc/PID/mem, fingerprint and classification together.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import platform
import random
import subprocess
import sys
import time

from pagefusion import scanner

PAGE = scanner.PAGE_SIZE
MIB = 1 << 20

# A child that maps random mergeable pages and waits: what a pass reads.
CHILD = """
import ctypes, mmap, random, sys
size = int(sys.argv[1])
area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
area.madvise(mmap.MADV_MERGEABLE)
rng = random.Random(7)
for at in range(0, size, 1 << 24):
    area[at:at + (1 << 24)] = rng.randbytes(min(1 << 24, size - at))
print(ctypes.addressof(ctypes.c_char.from_buffer(area)), flush=True)
sys.stdin.read()
"""


def anonymous_buffer(size: int) -> tuple[mmap.mmap, int]:
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    return area, ctypes.addressof(ctypes.c_char.from_buffer(area))


def fill_random(area: mmap.mmap, seed: int) -> None:
    rng = random.Random(seed)
    chunk = 16 * MIB
    for at in range(0, len(area), chunk):
        area[at : at + chunk] = rng.randbytes(min(chunk, len(area) - at))


def best_of(rounds: int, run) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def scan_pass_seconds(size: int, key: bytes, rounds: int) -> float:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()
        with scanner.PageScanner(child.pid, key, pages_per_pass=size // PAGE) as pages:
            pages.scan_pass()  # faults nothing in: the child wrote every page
            return best_of(rounds, pages.scan_pass)
    finally:
        child.kill()
        child.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="buffer size in MiB")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, best one counts")
    args = parser.parse_args()
    size = args.mib * MIB
    pages = size // PAGE
    key = random.Random(1).randbytes(scanner.KEY_SIZE)

    source, source_addr = anonymous_buffer(size)
    target, target_addr = anonymous_buffer(size)
    fill_random(source, 2)
    target[:] = bytes(size)  # fault the target in before timing

    copy_s = best_of(args.rounds, lambda: ctypes.memmove(target_addr, source_addr, size))
    hash_s = best_of(args.rounds, lambda: scanner.fingerprint_buffer(key, source))
    pass_s = scan_pass_seconds(size, key, args.rounds)

    copy_gbs = size / copy_s / 1e9
    hash_gbs = size / hash_s / 1e9
    print(f"machine      {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
    print(f"buffer       {args.mib} MiB = {pages} pages, best of {args.rounds} rounds")
    print(f"memcpy       {copy_gbs:6.2f} GB/s  {pages / copy_s:12,.0f} pages/s")
    print(f"fingerprint  {hash_gbs:6.2f} GB/s  {pages / hash_s:12,.0f} pages/s")
    print(f"ratio        {hash_gbs / copy_gbs:6.2f}  (fingerprint / memcpy, target >= 0.5)")
    print(
        f"scan pass    {size / pass_s / 1e9:6.2f} GB/s  {pages / pass_s:12,.0f} pages/s"
        "  (/proc/PID/mem read + fingerprint + classify, one pass)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
