"""The shut-off rule, enforced after the fact for changes libvirt lets through.

libvirt has no hook on define: ``virsh edit``, ``virsh define``, ``virsh
metadata`` and the API all change a running domain's page-fusion element
without asking. The daemon calls ``reconcile`` on every such event; for a
running domain it puts the element back to the value the domain runs with,
in the persistent definition and in the live XML, and keeps the rest of the
edit. For a shut-off domain the change is accepted, and the merge setting is
brought in line with it.

It also keeps the running stamp (see ``element``): in the live XML of a
running domain, the value it runs with; in no persistent definition, where a
stamp (copied there with a dumped live XML) would speak of a run long over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import libvirt

from pagefusion import domainxml, element, ledger, runstate
from pagefusion.element import (
    NAMESPACE,
    PREFIX,
    STAMP_LOCAL_NAME,
    STAMP_NAMESPACE,
    STAMP_PREFIX,
    PageFusion,
)
from pagefusion.errors import ElementError
from pagefusion.settings import INACTIVE_XML

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    name: str
    refused: PageFusion | str | None = None  # the refused value, or the bad element's reason
    kept: PageFusion | None = None
    redefined: bool = False


Read = PageFusion | str  # a value, or the reason its element is invalid


def _or_reason(read, domain) -> Read | None:
    try:
        return read(domain)
    except ElementError as err:
        return str(err)


def _read(xml: str) -> tuple[Read, Read | None]:
    """The element's value and the running stamp's (None without one), from one parse."""
    try:
        domain = element.parse_domain(xml)
    except ElementError as err:
        return str(err), str(err)
    return _or_reason(element.from_domain, domain), _or_reason(element.stamp_from_domain, domain)


def _value(xml: str) -> Read:
    return _read(xml)[0]


def _set_stamp(dom: libvirt.virDomain, value: PageFusion | None, flags: int) -> None:
    """Write the running stamp (or remove it, with None) where ``flags`` say."""
    text = value.to_metadata_xml(STAMP_LOCAL_NAME) if value is not None else None
    key = STAMP_PREFIX if value is not None else None
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, key, STAMP_NAMESPACE, flags)


def _drop_persistent_stamp(dom: libvirt.virDomain, stamp: Read | None) -> None:
    if stamp is not None:
        _set_stamp(dom, None, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        log.info("domain %r: removed a running stamp from its persistent definition", dom.name())


def running_value(dom: libvirt.virDomain) -> PageFusion:
    """The value a running domain was started with.

    The hook's record says it; a domain started before pagefusion was
    installed has none, and its live XML at first sight is taken instead.
    """
    record = runstate.load(dom.UUIDString())
    if record is not None:
        return record.page_fusion
    live = _value(dom.XMLDesc(0))
    value = live if isinstance(live, PageFusion) else PageFusion()
    record = runstate.DomainRecord(
        name=dom.name(),
        uuid=dom.UUIDString(),
        enabled=value.enabled,
        group=value.group,
        phase=runstate.PHASE_RUNNING,
        qemu_pid=runstate.qemu_pid_of(dom.name()),
    )
    runstate.save(record)
    return value


def _describe(value: PageFusion | str) -> str:
    return value.describe() if isinstance(value, PageFusion) else f"an invalid element ({value})"


def _reconcile_running(dom: libvirt.virDomain) -> Outcome:
    name = dom.name()
    keep = running_value(dom)
    refused: PageFusion | str | None = None
    redefined = False

    if dom.isPersistent():
        inactive = dom.XMLDesc(INACTIVE_XML)
        persistent, persistent_stamp = _read(inactive)
        if persistent != keep:
            refused = persistent
        xml, redefined = domainxml.with_page_fusion(inactive, keep, replace_invalid=True)
        if redefined:
            dom.connect().defineXML(xml)
        _drop_persistent_stamp(dom, persistent_stamp)

    live, stamp = _read(dom.XMLDesc(0))
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
    if live != keep:
        refused = refused or live
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, keep.to_metadata_xml(), PREFIX, NAMESPACE, flags
        )
    if stamp != keep:
        _set_stamp(dom, keep, flags)
        log.debug("domain %r: stamped its live XML with page fusion %s", name, keep.describe())

    if refused is not None:
        ledger.count(ledger.REJECTED_CHANGES)
        log.warning(
            "domain %r is running with page fusion %s: refused the change to %s;"
            " change page fusion while the domain is shut off",
            name,
            keep.describe(),
            _describe(refused),
        )
    return Outcome(name=name, refused=refused, kept=keep, redefined=redefined)


def _reconcile_shut_off(dom: libvirt.virDomain) -> Outcome:
    name = dom.name()
    inactive = dom.XMLDesc(INACTIVE_XML)
    value, stamp = _read(inactive)
    if not isinstance(value, PageFusion):
        # Nothing sensible to write; the next start is refused with the reason.
        log.warning("domain %r: %s", name, value)
        return Outcome(name=name)

    xml, changed = domainxml.with_page_fusion(inactive, value)
    if changed:
        dom.connect().defineXML(xml)
        log.info("domain %r: merge setting aligned with page fusion %s", name, value.describe())
    _drop_persistent_stamp(dom, stamp)
    entry = ledger.load(dom.UUIDString())
    if entry.accepted != value:
        ledger.accept(dom.UUIDString(), name, value, confirmed=False)
    return Outcome(name=name, kept=value, redefined=changed)


def reconcile(dom: libvirt.virDomain) -> Outcome:
    """Make the domain's page-fusion element obey the shut-off rule."""
    if dom.isActive():
        return _reconcile_running(dom)
    return _reconcile_shut_off(dom)
