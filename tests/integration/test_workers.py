"""One fusion worker per running page-fusion domain, for exactly as long as it runs."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import fusible_truth
import pytest
import testbed

from pagefusion import journal, ksm, pacing, runstate, supervision
from pagefusion.element import PageFusion
from pagefusion.worker import read_report

pytestmark = pytest.mark.libvirt

ON = PageFusion(enabled=True, group="pftest")
WORKER_START_S = 10.0
# A stopped worker runs under SCHED_IDLE: on a host busy with TCG guests its
# last milliseconds of CPU can take seconds to come.
WORKER_STOP_S = 30.0


def workers_of(uuid: str) -> list[int]:
    """Pids of processes running the worker of this domain."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pagefusion.worker" in argv and uuid.encode() in argv:
            found.append(int(entry.name))
    return found


def one_worker(uuid: str) -> bool:
    return len(workers_of(uuid)) == 1 and supervision.worker_pid(uuid) is not None


@pytest.fixture(scope="module")
def trio(libvirt_conn, guest_image):
    """Two page-fusion guests and one without, booted from the same image."""
    factory = testbed.GuestFactory(libvirt_conn, guest_image)
    specs = [factory.spec(ON), factory.spec(ON), factory.spec(PageFusion())]
    doms = [factory.define(spec) for spec in specs]
    for dom in doms:
        dom.create()
    for spec in specs:
        testbed.guests.wait_until_booted(spec)
    yield doms
    factory.cleanup()


def test_each_page_fusion_domain_has_one_worker_and_others_none(trio):
    on_a, on_b, off = trio
    assert testbed.eventually(lambda: one_worker(on_a.UUIDString()), WORKER_START_S)
    assert testbed.eventually(lambda: one_worker(on_b.UUIDString()), WORKER_START_S)
    assert workers_of(off.UUIDString()) == []


def test_a_second_start_of_a_worker_exits_at_once(trio):
    uuid = trio[0].UUIDString()
    assert testbed.eventually(lambda: one_worker(uuid), WORKER_START_S)
    supervision.launch(uuid)
    supervision.launch(uuid)
    assert not testbed.eventually(lambda: len(workers_of(uuid)) > 1, 2.0, interval_s=0.01) or (
        testbed.eventually(lambda: len(workers_of(uuid)) == 1, 5.0)
    )
    assert one_worker(uuid)


def test_ksm_merges_page_fusion_guests_and_never_the_other(trio, running_daemon):
    on_a, on_b, off = trio
    pids = [runstate.qemu_pid_of(dom.name()) for dom in trio]
    merged = testbed.eventually(
        lambda: all(ksm.process_stat(pid).merging_pages > 0 for pid in pids[:2]), 60.0, 0.5
    )
    assert merged, [ksm.process_stat(pid) for pid in pids]
    off_stat = ksm.process_stat(pids[2])
    assert off_stat.mergeable is False and off_stat.merging_pages == 0


def test_the_workers_fusible_count_is_within_ten_percent_of_the_exact_count(trio):
    on_a, on_b, _off = trio
    uuids = [on_a.UUIDString(), on_b.UUIDString()]

    # While KSM is busy merging, the kernel splits huge pages and remaps their
    # zero-filled parts to the zero page: the guest's memory is moving under
    # any count. Compare once KSM has settled, with reports made after that.
    settled = testbed.eventually(ksm_settled, 90.0, 0.5)
    assert settled, "KSM did not settle"
    since = time.time()

    def fresh_reports():
        reports = [read_report(uuid) for uuid in uuids]
        return all(r is not None and r.updated > since for r in reports) and reports

    reports = testbed.eventually(fresh_reports, 30.0, 0.2)
    assert reports, "the workers made no new report"
    estimate = sum(r.cycle["pages_fusible"] for r in reports)
    exact = fusible_truth.achievable_saving_pages([r.qemu_pid for r in reports])
    assert exact > 1000
    assert abs(estimate - exact) <= 0.10 * exact, (estimate, exact)


def ksm_settled(quiet_s: float = 3.0) -> bool:
    """True if KSM's fused memory did not change for ``quiet_s`` seconds."""
    before = ksm.shared_bytes()
    time.sleep(quiet_s)
    return ksm.shared_bytes() == before


def test_libvirtd_restart_leaves_exactly_one_worker_each(trio, libvirt_conn):
    uuids = [dom.UUIDString() for dom in trio]
    libvirt_conn.restart_libvirtd()
    for uuid in uuids[:2]:
        assert testbed.eventually(lambda u=uuid: one_worker(u), WORKER_START_S)
    assert workers_of(uuids[2]) == []
    assert all(libvirt_conn.lookupByUUIDString(uuid).isActive() for uuid in uuids)


def test_reconnect_brings_back_the_workers_that_are_missing(trio, libvirt_conn, pf_daemon_process):
    # With the daemon down nothing else replaces a worker: only libvirtd's
    # reconnect call, when it restarts and finds the guests running, can.
    uuids = [dom.UUIDString() for dom in trio]
    pf_daemon_process.stop()
    try:
        for uuid in uuids[:2]:
            supervision.stop(uuid)
            assert testbed.eventually(lambda u=uuid: workers_of(u) == [], WORKER_STOP_S)
        calls_before = len(journal.read())

        libvirt_conn.restart_libvirtd()

        for uuid in uuids[:2]:
            assert testbed.eventually(lambda u=uuid: one_worker(u), WORKER_START_S)
        assert workers_of(uuids[2]) == []

        # libvirtd reconnects its domains in threads of their own: the third
        # domain's call may still run when the first two have their workers.
        def reconnected() -> set[str]:
            calls = journal.read()[calls_before:]
            return {c["uuid"] for c in calls if c["operation"] == "reconnect"}

        assert testbed.eventually(lambda: set(uuids) <= reconnected(), WORKER_START_S), (
            reconnected()
        )
    finally:
        pf_daemon_process.start()


def test_the_worker_goes_when_its_domain_stops_or_crashes(guest_factory):
    stopped = guest_factory.boot(guest_factory.spec(ON))
    crashed = guest_factory.boot(guest_factory.spec(ON))
    for dom in (stopped, crashed):
        assert testbed.eventually(lambda d=dom: one_worker(d.UUIDString()), WORKER_START_S)

    stopped.destroy()
    os.kill(runstate.qemu_pid_of(crashed.name()), signal.SIGKILL)

    for dom in (stopped, crashed):
        assert testbed.eventually(lambda d=dom: workers_of(d.UUIDString()) == [], 10.0)
        assert read_report(dom.UUIDString()) is None


def test_status_shows_the_pacing_decision_the_settings_in_force_and_each_worker(
    trio, running_daemon
):
    on_a, on_b, off = trio
    for dom in (on_a, on_b):
        assert testbed.eventually(lambda d=dom: one_worker(d.UUIDString()), WORKER_START_S)
    assert testbed.eventually(lambda: pacing.read_decision() is not None, 10.0)

    shown_names = ("run", "pages_to_scan", "sleep_millisecs")
    before = {name: ksm.read_value(name) for name in shown_names}
    status = json.loads(testbed.cli("status", "--json", check=True).stdout)
    after = {name: ksm.read_value(name) for name in shown_names}

    assert status["daemon_pid"] == running_daemon.process.pid
    decision = status["pacing"]
    assert decision["mode"] in ("fast", "settling", "slow") and decision["reason"]
    assert decision["domains"] >= 2
    assert decision["backlog_pages"] == max(0, decision["fusible_pages"] - decision["fused_pages"])
    # The settings shown are those in force in the kernel (pacing may change
    # them between the reads).
    for name in shown_names:
        assert status["ksm"][name] in (before[name], after[name]), name
    assert status["ksm"]["run"] == ksm.RUN_MERGE
    shown = {w["uuid"]: w for w in status["workers"]}
    for dom in (on_a, on_b):
        worker = shown[dom.UUIDString()]
        assert worker["worker_pid"] == supervision.worker_pid(dom.UUIDString())
        assert worker["domain"] == dom.name()
    assert off.UUIDString() not in shown

    text = testbed.cli("status", check=True).stdout
    assert text.splitlines()[0].split(":")[1].strip() in ("fast", "settling", "slow"), text
    assert "backlog" in text.splitlines()[1]
    for dom in (on_a, on_b):
        assert repr(dom.name()) in text
