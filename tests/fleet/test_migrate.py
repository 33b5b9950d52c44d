"""Moving a guest between two fleet hosts keeps the page-fusion element.

A migration carries the guest's live XML, in which the source host's daemon
stamped the value the guest runs with; the target's ``migrate`` hook refuses
an incoming XML whose element differs from that stamp (``virsh migrate
--xml``), and lets the guest's own XML through. A changed persistent XML
sent along (``--persistent-xml``) is a change of a running domain on the
target, which the target's daemon undoes. A state saved on one host and
restored on another is checked against the same stamp, which the saved XML
carries, as the other host's ledger knows nothing of the guest.
"""

from __future__ import annotations

import subprocess

import hosts
import libvirt
import pytest
import testbed

from pagefusion import element, services
from pagefusion.element import PageFusion
from pagefusion.settings import INACTIVE_XML

pytestmark = [pytest.mark.fleet, pytest.mark.libvirt]

STAMPED_WITHIN_S = 10.0
UNDONE_WITHIN_S = 5.0


def stamp_of(dom) -> PageFusion | None:
    return element.stamp_from_domain(element.parse_domain(dom.XMLDesc(0)))


def daemon_log_size() -> int:
    # The fleet's hosts share the machine's /var/log, so their daemons' log too.
    return services.DAEMON_LOG.stat().st_size if services.DAEMON_LOG.exists() else 0


def daemon_log_since(offset: int) -> str:
    with open(services.DAEMON_LOG, errors="replace") as log:
        log.seek(offset)
        return log.read()


def active_names(conn: libvirt.virConnect) -> list[str]:
    return [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]


def virsh_on(host, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["virsh", "-c", host.uri, *args], capture_output=True, text=True, timeout=180
    )


def migrate(source, target, name: str, *args: str) -> subprocess.CompletedProcess:
    """``virsh migrate --live`` from one fleet host to another, over loopback TCP."""
    port = hosts.free_loopback_port(49300, 49399)
    return virsh_on(
        source, "migrate", "--live", name, target.uri,
        "--migrateuri", f"tcp://127.0.0.1:{port}", *args,
    )  # fmt: skip


@pytest.fixture
def running_on_source(fleet, enabled):
    """A page-fusion guest running on fleet1, and fleet3 to migrate it to."""
    source, target = fleet.host("fleet1"), fleet.host("fleet3")
    name = fleet.guests[source.name][-1]
    dom = fleet.domain(source, name)
    dom.create()
    try:
        yield source, target, dom
    finally:
        for host in (target, source):
            conn = fleet.connect(host)
            if name in active_names(conn):
                conn.lookupByName(name).destroy()
        if name in [d.name() for d in fleet.connect(target).listAllDomains()]:
            fleet.domain(target, name).undefine()


def test_migration_refuses_a_changed_element_and_takes_the_guests_own(
    fleet, running_on_source, tmp_path
):
    source, target, dom = running_on_source
    name, ran_with = dom.name(), PageFusion(enabled=True, group=fleet.group)
    assert testbed.eventually(lambda: stamp_of(dom) == ran_with, STAMPED_WITHIN_S), dom.XMLDesc(0)

    own = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    changed = tmp_path / "changed.xml"
    changed.write_text(own.replace(f'group="{fleet.group}"/>', 'group="elsewhere"/>', 1))
    assert element.from_domain(element.parse_domain(changed.read_text())).group == "elsewhere"

    refused = migrate(source, target, name, "--xml", str(changed))

    assert refused.returncode != 0
    assert (
        f"pagefusion: domain {name!r} runs with page fusion on (group {fleet.group!r}) on the"
        " source host, but the incoming XML says on (group 'elsewhere')"
    ) in refused.stderr, refused.stderr
    assert dom.isActive()
    assert name not in active_names(fleet.connect(target))

    persistent = tmp_path / "persistent.xml"
    persistent.write_text(
        dom.XMLDesc(INACTIVE_XML).replace(f'group="{fleet.group}"/>', 'group="elsewhere"/>', 1)
    )
    log_mark = daemon_log_size()
    done = migrate(source, target, name, "--persistent", "--persistent-xml", str(persistent))

    assert done.returncode == 0, done.stderr
    arrived = fleet.domain(target, name)
    assert arrived.isActive() and not dom.isActive()
    live = element.parse_domain(arrived.XMLDesc(0))
    assert element.from_domain(live) == ran_with
    assert element.stamp_from_domain(live) == ran_with
    assert testbed.eventually(
        lambda: fleet.page_fusion(target, name) == ran_with, UNDONE_WITHIN_S
    ), arrived.XMLDesc(INACTIVE_XML)
    # Undone, not refused on the way: the target's daemon says so.
    warning = (
        f"domain {name!r} is running with page fusion on (group {fleet.group!r}): refused the"
        " change to on (group 'elsewhere')"
    )
    assert testbed.eventually(lambda: warning in daemon_log_since(log_mark), UNDONE_WITHIN_S)


def test_restore_on_another_host_refuses_a_changed_element(fleet, running_on_source):
    source, target, dom = running_on_source
    name, ran_with = dom.name(), PageFusion(enabled=True, group=fleet.group)
    assert testbed.eventually(lambda: stamp_of(dom) == ran_with, STAMPED_WITHIN_S), dom.XMLDesc(0)
    # The fleet's folder is the machine's, and so the same path on every host.
    image = fleet.base / f"{name}.saved"
    dom.save(str(image))
    try:
        saved = virsh_on(target, "save-image-dumpxml", str(image))
        assert saved.returncode == 0, saved.stderr
        changed = fleet.base / f"{name}.changed.xml"
        changed.write_text(
            saved.stdout.replace(f'group="{fleet.group}"/>', 'group="elsewhere"/>', 1)
        )
        assert element.from_domain(element.parse_domain(changed.read_text())).group == "elsewhere"

        refused = virsh_on(target, "restore", str(image), "--xml", str(changed))

        assert refused.returncode != 0
        assert (
            f"pagefusion: domain {name!r} was saved while running with page fusion on (group"
            f" {fleet.group!r}), but the XML to restore says on (group 'elsewhere')"
        ) in refused.stderr, refused.stderr
        assert name not in active_names(fleet.connect(target))

        done = virsh_on(target, "restore", str(image))
        assert done.returncode == 0, done.stderr
        assert fleet.domain(target, name).isActive()
    finally:
        image.unlink(missing_ok=True)
