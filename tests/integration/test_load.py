"""Load: many guests starting at once, and a burst of refused changes."""

from __future__ import annotations

import concurrent.futures
import time

import libvirt
import pytest
import testbed

from pagefusion import domainxml, element, journal, ledger, supervision
from pagefusion.element import NAMESPACE, PREFIX, PageFusion
from pagefusion.settings import INACTIVE_XML

pytestmark = pytest.mark.libvirt

ON = PageFusion(enabled=True, group="pftest")
GUESTS_AT_ONCE = 30
# What one hook call may take at most, even with 30 guests starting at once
# on two cores: libvirtd waits for it.
HOOK_BUDGET_MS = 2000
BURST_EVENTS = 1000


def test_thirty_guests_started_at_once_each_get_one_worker(guest_factory, running_daemon):
    specs = [guest_factory.spec(ON, unique_mib=1, volatile_mib=0) for _ in range(GUESTS_AT_ONCE)]
    doms = [guest_factory.define(spec) for spec in specs]
    since = time.time()

    with concurrent.futures.ThreadPoolExecutor(GUESTS_AT_ONCE) as pool:
        list(pool.map(lambda dom: dom.create(), doms))

    assert all(dom.isActive() for dom in doms)
    uuids = [dom.UUIDString() for dom in doms]
    all_have_one = testbed.eventually(
        lambda: all(supervision.worker_pid(uuid) for uuid in uuids), 60.0, 0.5
    )
    assert all_have_one, [u for u in uuids if not supervision.worker_pid(u)]
    names = {dom.name() for dom in doms}
    calls = [c for c in journal.read() if c["time"] >= since and c["domain"] in names]
    slowest = max(c["duration_ms"] for c in calls)
    print(f"{GUESTS_AT_ONCE} guests at once: slowest hook call {slowest:.0f} ms")
    assert slowest <= HOOK_BUDGET_MS, slowest
    for name in names:
        ops = [c["operation"] for c in calls if c["domain"] == name]
        assert ops[:3] == ["prepare", "start", "started"], (name, ops)


def test_a_burst_of_a_thousand_refused_changes_is_all_undone(guest_factory, running_daemon):
    dom = guest_factory.boot(guest_factory.spec(ON))
    conn = guest_factory.conn
    rejected = ledger.counters().get(ledger.REJECTED_CHANGES, 0)
    changed_xml, _ = domainxml.with_page_fusion(
        dom.XMLDesc(INACTIVE_XML), PageFusion(enabled=False, group="burst")
    )

    started = time.monotonic()
    for index in range(BURST_EVENTS // 2):
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            f'<page-fusion state="off" group="burst-{index}"/>',
            PREFIX,
            NAMESPACE,
            libvirt.VIR_DOMAIN_AFFECT_CONFIG | libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )
        conn.defineXML(changed_xml)
    burst_s = time.monotonic() - started

    def settled() -> bool:
        persistent = element.from_domain(element.parse_domain(dom.XMLDesc(INACTIVE_XML)))
        live = element.from_domain(element.parse_domain(dom.XMLDesc(0)))
        return persistent == ON and live == ON

    assert testbed.eventually(settled, 10.0, 0.1), "the burst was not fully undone"
    assert ledger.counters()[ledger.REJECTED_CHANGES] > rejected
    # The daemon kept up: one more change is undone as fast as ever.
    testbed.virsh_set_metadata(dom.name(), '<page-fusion state="off"/>', "--config")
    after = time.monotonic()
    assert testbed.eventually(settled, 2.0, 0.02)
    assert time.monotonic() - after < 2.0
    print(f"{BURST_EVENTS} events sent in {burst_s:.1f} s, all undone")
