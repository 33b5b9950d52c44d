"""The README's main job, ``pagefusion demo``, on this host's real libvirtd and KSM."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagefusion import demo, ksm, runstate

pytestmark = [pytest.mark.libvirt, pytest.mark.ksm]

DEMO_TIMEOUT_S = 600


def test_the_demo_fuses_the_page_fusion_guests_and_never_the_other(libvirt_conn, pf_daemon_process):
    # The demo installs pagefusion and starts its own daemon, as on a new host.
    pf_daemon_process.stop()
    specs = demo.demo_specs()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pagefusion.cli", "demo"],
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT_S,
        )
        assert done.returncode == 0, done.stderr
        for spec in specs:
            assert spec.name in done.stdout

        # The kernel's own per-process counters, read after the demo ended.
        for spec in specs:
            stat = ksm.process_stat(runstate.qemu_pid_of(spec.name))
            assert stat is not None, spec.name
            if spec.page_fusion.enabled:
                assert stat.mergeable and stat.merging_pages > 0, (spec.name, stat)
            else:
                assert stat.mergeable is False and stat.shared_bytes == 0, (spec.name, stat)
        assert ksm.shared_bytes() > 0
    finally:
        subprocess.run(
            [sys.executable, "-m", "pagefusion.cli", "demo", "--remove"],
            capture_output=True,
            timeout=120,
        )
        libvirt_conn.reconnect()
        pf_daemon_process.start()
