"""The hook, installed in libvirtd, sees every step of real guests' lives."""

from __future__ import annotations

import hashlib

import pytest
import testbed

from pagefusion import hook, journal, runstate
from pagefusion.element import PageFusion

pytestmark = pytest.mark.libvirt

LIFE = ["prepare", "start", "started", "stopped", "release"]


@pytest.fixture(params=[hook.SERVED_BY_DAEMON, hook.SERVED_BY_HOOK_PROCESS])
def served_by(request, pf_daemon_process):
    """Who runs the hook's calls: the daemon, or, with the daemon down, the hook itself."""
    if request.param == hook.SERVED_BY_DAEMON:
        pf_daemon_process.start()
        yield request.param
        return
    pf_daemon_process.stop()
    try:
        yield request.param
    finally:
        pf_daemon_process.start()


def test_two_guests_pass_through_every_step_in_order(guest_factory, served_by):
    testbed.clear_recorder()
    before = len(journal.read())
    specs = [
        guest_factory.spec(PageFusion(enabled=True, group="lifecycle")),
        guest_factory.spec(PageFusion()),
    ]
    doms = [guest_factory.define(spec) for spec in specs]
    for dom in doms:
        dom.create()
    for spec in specs:
        testbed.guests.wait_until_booted(spec)
    uuids = {dom.name(): dom.UUIDString() for dom in doms}
    for dom in doms:
        assert runstate.load(dom.UUIDString()).phase == runstate.PHASE_RUNNING
        dom.destroy()

    calls = journal.read()[before:]
    recorded = testbed.recorded_calls()
    for name, uuid in uuids.items():
        ours = [c for c in calls if c["domain"] == name]
        assert [c["operation"] for c in ours] == LIFE, ours
        assert all(c["ok"] and c["uuid"] == uuid for c in ours)
        assert {c["served_by"] for c in ours} == {served_by}

        # The recorder hook runs after ours on the same call and keeps the XML
        # libvirtd sent: pagefusion saw exactly that document at each step.
        theirs = [c for c in recorded if c.args[0] == name]
        assert [c.args[1] for c in theirs] == LIFE
        for mine, seen in zip(ours, theirs, strict=True):
            assert f"<uuid>{uuid}</uuid>" in seen.xml
            assert mine["xml_sha256"] == hashlib.sha256(seen.xml.encode()).hexdigest()
        assert runstate.load(uuid) is None
