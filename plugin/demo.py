"""The demonstration: similar guests, some with page fusion, and what they save.

Boots three small guests with page fusion on and one with it off, waits until
KSM has fused what it can, and reports each guest's fused memory and the
host's, from the kernel's own counters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pagefusion import guestimage, guests, metrics, services
from pagefusion.connection import open_connection
from pagefusion.element import PageFusion
from pagefusion.install import install

log = logging.getLogger(__name__)

DEMO_PREFIX = "pagefusion-demo-"
DEMO_GROUP = "demo"
SETTLE_S = 10.0
FUSE_TIMEOUT_S = 300.0


def demo_specs(fused: int = 3, unfused: int = 1) -> list[guests.GuestSpec]:
    on = PageFusion(enabled=True, group=DEMO_GROUP)
    specs = [guests.GuestSpec(f"{DEMO_PREFIX}{i + 1}", on) for i in range(fused)]
    specs += [
        guests.GuestSpec(f"{DEMO_PREFIX}{fused + i + 1}", PageFusion()) for i in range(unfused)
    ]
    return specs


def wait_until_fused(
    names: list[str], progress: Callable[[str], None], timeout_s: float = FUSE_TIMEOUT_S
) -> metrics.HostMetrics:
    """Wait until the host's fused memory stops growing for SETTLE_S seconds."""
    started = time.monotonic()
    best, best_at = -1, started
    while True:
        figures = metrics.collect(names)
        now = time.monotonic()
        if figures.shared_bytes > best:
            best, best_at = figures.shared_bytes, now
            progress(f"{now - started:5.1f} s: {figures.shared_bytes / 2**20:8.1f} MiB fused")
        if best > 0 and now - best_at >= SETTLE_S:
            return figures
        if now - started >= timeout_s:
            return figures
        time.sleep(1.0)


def remove_demo(uri: str | None = None) -> list[str]:
    conn = open_connection(uri)
    names = [d.name() for d in conn.listAllDomains() if d.name().startswith(DEMO_PREFIX)]
    for name in names:
        guests.remove(conn, name)
    return names


def run(progress: Callable[[str], None], uri: str | None = None) -> metrics.HostMetrics:
    services.start_libvirt()
    install(uri=uri, restart_libvirtd=True, start_daemon=True)
    conn = open_connection(uri)
    image = guestimage.ensure_image()

    specs = demo_specs()
    for spec in specs:
        guests.remove(conn, spec.name)
        guests.define(conn, spec, image).create()
        progress(f"started {spec.name} (page fusion {spec.page_fusion.describe()})")
    for spec in specs:
        seconds = guests.wait_until_booted(spec)
        progress(f"{spec.name} booted after {seconds:.1f} s")

    return wait_until_fused([s.name for s in specs], progress)
