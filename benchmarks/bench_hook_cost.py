"""What pagefusion's hook adds to a domain's start, measured side by side.

Starts and destroys the same small page-fusion guest N times in each of
three set-ups: the hook installed with pagefusion's daemon running (the
hook's native front hands each call to the daemon), the hook installed
without the daemon (each call runs in a Python process of its own), and no
hook (libvirtd restarted each way, since it reads its hooks only when it
starts). It compares the median time of ``virDomainCreate``, which returns
once libvirt has run the prepare, start and started hooks.

    /opt/pagefusion/venv/bin/python benchmarks/bench_hook_cost.py [--starts 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import testbed  # noqa: E402

from pagefusion import install, paths, services  # noqa: E402
from pagefusion.daemon import daemon_pid  # noqa: E402
from pagefusion.element import PageFusion  # noqa: E402


def start_times(conn, spec, image, starts: int) -> list[float]:
    times = []
    testbed.guests.remove(conn, spec.name)
    dom = testbed.guests.define(conn, spec, image)
    for _ in range(starts):
        began = time.perf_counter()
        dom.create()
        times.append((time.perf_counter() - began) * 1000)
        dom.destroy()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=15)
    args = parser.parse_args()

    conn = testbed.ensure_libvirtd_with_hook()
    testbed.remove_leftover_guests(conn)
    image = testbed.guestimage.ensure_image()
    spec = testbed.GuestFactory(conn, image).spec(PageFusion(enabled=True, group="bench"))
    recorder = testbed.RECORDER_PATH.read_text() if testbed.RECORDER_PATH.exists() else None
    daemon_was_running = daemon_pid() is not None
    try:
        # The tests' recorder hook would be counted too: take it out for all runs.
        testbed.RECORDER_PATH.unlink(missing_ok=True)
        services.restart_libvirtd()
        services.start_daemon()
        conn = testbed.SharedConnection()
        served = start_times(conn, spec, image, args.starts)

        services.stop_daemon()
        unserved = start_times(conn, spec, image, args.starts)

        install.remove_hook()
        services.restart_libvirtd()
        conn = testbed.SharedConnection()
        without_hook = start_times(conn, spec, image, args.starts)
    finally:
        testbed.guests.remove(conn, spec.name)
        install.install_hook()
        if recorder is not None:
            testbed.RECORDER_PATH.write_text(recorder)
            testbed.RECORDER_PATH.chmod(0o755)
        services.restart_libvirtd()
        if daemon_was_running:
            services.start_daemon()

    base = statistics.median(without_hook)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, hook {paths.hook_path()}")
    print(f"{args.starts} starts each of one TCG guest with page fusion on; median start:")
    for label, times in (
        ("hook, served by the daemon", served),
        ("hook, no daemon (own process)", unserved),
        ("no hook", without_hook),
    ):
        median = statistics.median(times)
        print(f"  {label:30} {median:7.1f} ms   added {median - base:6.1f} ms")
    added = statistics.median(served) - base
    print(f"added by the hook as installed: {added:.1f} ms (target <= 60 ms)")


if __name__ == "__main__":
    main()
