"""``pagefusion install`` and ``uninstall`` on this host's real libvirtd and KSM."""

from __future__ import annotations

import json
import time

import pytest
import testbed

from pagefusion import install, ksm, paths, supervision
from pagefusion.daemon import daemon_pid
from pagefusion.element import PageFusion

pytestmark = [pytest.mark.libvirt, pytest.mark.ksm]

# KSM settings of "the host before pagefusion", unlike anything pagefusion sets.
HOSTS_OWN = {"pages_to_scan": 123, "sleep_millisecs": 77, "run": ksm.RUN_STOP}


def test_uninstall_stops_pacing_and_puts_back_the_hosts_ksm_settings(
    guest_factory, libvirt_conn, pf_daemon_process
):
    pf_daemon_process.stop()
    # Start from a host without pagefusion's saved settings.
    testbed.cli("uninstall", check=True)
    for name, value in HOSTS_OWN.items():
        ksm.write_value(name, value)
    try:
        report = json.loads(
            testbed.cli(
                "install", "--restart-libvirtd", "--start-daemon", "--json", check=True
            ).stdout
        )
        assert report["daemon_started"] and report["libvirtd_restarted"]
        libvirt_conn.reconnect()
        dom = guest_factory.boot(guest_factory.spec(PageFusion(enabled=True, group="pftest")))
        uuid = dom.UUIDString()
        # While a page-fusion domain runs, pagefusion paces KSM.
        assert testbed.eventually(
            lambda: (
                ksm.read_value("run") == ksm.RUN_MERGE
                and ksm.read_value("pages_to_scan") != HOSTS_OWN["pages_to_scan"]
            ),
            15.0,
        )
        assert testbed.eventually(lambda: supervision.worker_pid(uuid) is not None, 10.0)

        done = testbed.cli("uninstall", check=True)

        assert "KSM settings restored" in done.stdout
        assert daemon_pid() is None
        assert testbed.eventually(lambda: supervision.worker_pid(uuid) is None, 10.0)
        assert not paths.hook_path().exists()
        # A daemon or worker left behind would pace KSM again within a second.
        time.sleep(3.0)
        assert {name: ksm.read_value(name) for name in HOSTS_OWN} == HOSTS_OWN
        assert dom.isActive()  # the guest itself is left alone
    finally:
        install.install_hook()
        libvirt_conn.restart_libvirtd()
        pf_daemon_process.start()
