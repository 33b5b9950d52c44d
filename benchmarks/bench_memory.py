"""Resident memory of the fusion workers against their guests' RAM, and of the daemon.

Boots page-fusion guests of several sizes, waits until each worker has
finished a few cycles, and reads VmRSS of every worker and of the daemon.

    /opt/pagefusion/venv/bin/python benchmarks/bench_memory.py [--sizes 128,256,512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import testbed  # noqa: E402

from pagefusion import services, supervision  # noqa: E402
from pagefusion.daemon import daemon_pid  # noqa: E402
from pagefusion.element import PageFusion  # noqa: E402
from pagefusion.worker import read_report  # noqa: E402

MIB = 2**20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,256,512", help="guest RAM sizes in MiB")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    conn = testbed.ensure_libvirtd_with_hook()
    testbed.remove_leftover_guests(conn)
    services.start_daemon()
    factory = testbed.GuestFactory(conn, testbed.guestimage.ensure_image())
    rows = []
    try:
        specs = [factory.spec(PageFusion(enabled=True, group="bench"), memory_mib=size)
                 for size in sizes]  # fmt: skip
        doms = [factory.define(spec) for spec in specs]
        for dom in doms:
            dom.create()
        for spec in specs:
            testbed.guests.wait_until_booted(spec)
        uuids = [dom.UUIDString() for dom in doms]
        testbed.eventually(
            lambda: all((r := read_report(u)) and r.cycles >= 3 for u in uuids), 120.0, 0.5
        )
        for size, uuid in zip(sizes, uuids, strict=True):
            rss = rss_bytes(supervision.worker_pid(uuid))
            limit = 24 * MIB + 4 * MIB * size / 1024
            rows.append((f"worker, {size} MiB guest", rss, limit))
        rows.append((f"daemon, {len(sizes)} guests", rss_bytes(daemon_pid()), 64 * MIB))
    finally:
        factory.cleanup()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    for label, rss, limit in rows:
        print(
            f"  {label:<24} {rss / MIB:6.1f} MiB   limit {limit / MIB:5.1f} MiB"
            f"   ratio {rss / limit:.2f}"
        )


if __name__ == "__main__":
    main()
