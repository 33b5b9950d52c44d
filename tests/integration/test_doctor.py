"""``pagefusion doctor`` tells a script whether the host is ready, and why not."""

from __future__ import annotations

import json

import pytest
import testbed

from pagefusion.element import PageFusion

pytestmark = pytest.mark.libvirt


def doctor() -> tuple[int, dict[str, dict]]:
    done = testbed.cli("doctor", "--json")
    return done.returncode, {c["check"]: c for c in json.loads(done.stdout)}


def test_a_ready_host_passes(running_daemon):
    code, checks = doctor()
    assert code == 0, checks
    assert checks["hook"]["detail"].endswith("installed and seen by libvirtd")


def test_a_missing_daemon_and_an_exposed_domain_fail(guest_factory, pf_daemon_process):
    dom = guest_factory.boot(guest_factory.spec(PageFusion(enabled=True, group="pftest")))
    pf_daemon_process.stop()
    try:
        # Without the daemon, a live change leaves a domain that says "off"
        # while its QEMU memory stays mergeable.
        testbed.virsh_set_metadata(dom.name(), '<page-fusion state="off"/>', "--live")
        code, checks = doctor()
    finally:
        pf_daemon_process.start()

    assert code == 1
    assert not checks["daemon"]["ok"]
    assert not checks["isolation"]["ok"]
    assert repr(dom.name()) in checks["isolation"]["detail"]
