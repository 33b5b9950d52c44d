"""Real processes killed or broken while guests run: pagefusion keeps working and loses nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import testbed
from lxml import etree

from pagefusion import config, paths, runstate, supervision
from pagefusion.element import PageFusion
from pagefusion.settings import INACTIVE_XML
from pagefusion.worker import read_report

pytestmark = pytest.mark.libvirt

ON = PageFusion(enabled=True, group="pftest")
KSM_DIR = "/sys/kernel/mm/ksm"


def canonical(xml: str) -> str:
    return etree.canonicalize(xml, strip_text=True)


def wait_one_worker(uuid: str) -> int:
    pid = testbed.eventually(lambda: supervision.worker_pid(uuid), 10.0)
    assert pid, f"no worker for {uuid}"
    return pid


def test_a_killed_worker_is_replaced_within_ten_seconds(guest_factory, running_daemon):
    dom = guest_factory.boot(guest_factory.spec(ON))
    first = wait_one_worker(dom.UUIDString())

    os.kill(first, signal.SIGKILL)
    started = time.monotonic()
    second = testbed.eventually(
        lambda: (pid := supervision.worker_pid(dom.UUIDString())) not in (None, first) and pid,
        10.0,
    )

    assert second, "the daemon did not replace the killed worker"
    assert time.monotonic() - started < 10.0


@pytest.mark.parametrize("delay_ms", [0, 5, 20, 60])
def test_the_daemon_killed_while_undoing_a_change_leaves_the_definition_whole(
    guest_factory, pf_daemon_process, delay_ms
):
    dom = guest_factory.boot(guest_factory.spec(ON))
    pf_daemon_process.start()
    before = dom.XMLDesc(INACTIVE_XML)

    # Freeze the daemon, let a refused change in, then let it run for a few
    # milliseconds of its undo and kill it.
    process = pf_daemon_process.process
    os.kill(process.pid, signal.SIGSTOP)
    testbed.virsh_set_metadata(dom.name(), '<page-fusion state="off"/>', "--config")
    os.kill(process.pid, signal.SIGCONT)
    time.sleep(delay_ms / 1000)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    pf_daemon_process.start()
    restored = testbed.eventually(
        lambda: canonical(dom.XMLDesc(INACTIVE_XML)) == canonical(before), 5.0
    )
    assert restored, dom.XMLDesc(INACTIVE_XML)
    assert dom.isActive()


def test_a_crashed_qemu_takes_its_worker_and_metrics_away(guest_factory, running_daemon):
    dom = guest_factory.boot(guest_factory.spec(ON))
    uuid = dom.UUIDString()
    worker = wait_one_worker(uuid)

    os.kill(runstate.qemu_pid_of(dom.name()), signal.SIGKILL)

    assert testbed.eventually(lambda: supervision.worker_pid(uuid) is None, 10.0)
    assert not Path(f"/proc/{worker}").exists() or testbed.eventually(
        lambda: not Path(f"/proc/{worker}").exists(), 5.0
    )
    assert read_report(uuid) is None
    shown = json.loads(testbed.cli("metrics", "query", "--json").stdout)
    assert dom.name() not in [d["name"] for d in shown["domains"]]


@contextlib.contextmanager
def ksm_made(kind: str):
    """KSM's sysfs directory read-only, or hidden (as on a kernel without KSM)."""
    if kind == "read-only":
        subprocess.run(["mount", "--bind", KSM_DIR, KSM_DIR], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", KSM_DIR], check=True)
    else:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0555", "none", KSM_DIR],
                       check=True)  # fmt: skip
    try:
        yield
    finally:
        subprocess.run(["umount", KSM_DIR], check=True)


@contextlib.contextmanager
def host_config(text: str):
    path = config.CONFIG_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else None
    path.write_text(text)
    try:
        yield
    finally:
        if old is None:
            path.unlink()
        else:
            path.write_text(old)


@pytest.mark.parametrize("kind", ["read-only", "missing"])
def test_without_usable_ksm_only_page_fusion_domains_follow_the_policy(guest_factory, kind):
    off = guest_factory.define(guest_factory.spec(PageFusion()))
    on = guest_factory.define(guest_factory.spec(ON))
    with ksm_made(kind):
        assert testbed.virsh("start", off.name(), check=False).returncode == 0

        refused = testbed.virsh("start", on.name(), check=False)
        assert refused.returncode != 0
        expected = "read-only" if kind == "read-only" else "missing (no CONFIG_KSM"
        assert f"domain {on.name()!r} has page fusion on, but KSM is {expected}" in refused.stderr
        assert "unavailable = allow" in refused.stderr

        with host_config("[ksm]\nunavailable = allow\n"):
            assert testbed.virsh("start", on.name(), check=False).returncode == 0


@contextlib.contextmanager
def state_dirs_made(kind: str):
    """pagefusion's state directories full, or read-only."""
    mounted = []
    try:
        for directory in (paths.RUN_DIR, paths.STATE_DIR):
            options = "size=64k,mode=0700" + (",ro" if kind == "read-only" else "")
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "none", str(directory)],
                           check=True)  # fmt: skip
            mounted.append(directory)
            if kind == "full":
                with contextlib.suppress(OSError):
                    (directory / "filler").write_bytes(b"\0" * (64 << 10))
        yield
    finally:
        for directory in reversed(mounted):
            subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_an_unusable_state_directory_fails_closed_for_fusion_and_open_otherwise(
    guest_factory, kind
):
    off = guest_factory.define(guest_factory.spec(PageFusion()))
    on = guest_factory.define(guest_factory.spec(ON))
    with state_dirs_made(kind):
        started = time.monotonic()
        assert testbed.virsh("start", off.name(), check=False).returncode == 0

        refused = testbed.virsh("start", on.name(), check=False)
        assert refused.returncode != 0
        assert f"domain {on.name()!r} has page fusion on, but pagefusion cannot record" in (
            refused.stderr
        )
        assert "Traceback" not in refused.stderr
        assert time.monotonic() - started < 30.0  # no hang
    off.destroy()
