"""Reading and changing a domain's page-fusion setting through libvirt.

The rule: the setting changes only while the domain is shut off, as with
VirtualBox's per-VM switch. The change goes into the persistent definition
and takes effect at the next start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import libvirt

from pagefusion import connection, domainxml, element, ledger, runstate
from pagefusion.element import PageFusion
from pagefusion.errors import RuleError

log = logging.getLogger(__name__)

INACTIVE_XML = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


@dataclass(frozen=True)
class DomainSetting:
    name: str
    uuid: str
    state: str
    persistent: PageFusion
    running_with: PageFusion | None
    merging_disabled: bool

    def as_dict(self) -> dict[str, object]:
        def value(pf: PageFusion | None) -> dict[str, object] | None:
            return None if pf is None else {"state": pf.state, "group": pf.group}

        return {
            "name": self.name,
            "uuid": self.uuid,
            "state": self.state,
            "page_fusion": value(self.persistent),
            "running_with": value(self.running_with),
            "merging_disabled": self.merging_disabled,
        }


def read(dom: libvirt.virDomain) -> DomainSetting:
    """The persistent setting of a domain and the value it runs with, if running."""
    domain = element.parse_domain(dom.XMLDesc(INACTIVE_XML))
    record = runstate.load(dom.UUIDString()) if dom.isActive() else None
    running_with = None
    if dom.isActive():
        # The hook's record is the value the domain was started with; a live
        # XML read is the fallback for domains started before pagefusion.
        running_with = (
            record.page_fusion
            if record
            else element.from_domain(element.parse_domain(dom.XMLDesc(0)))
        )
    return DomainSetting(
        name=dom.name(),
        uuid=dom.UUIDString(),
        state=connection.state_name(dom),
        persistent=element.from_domain(domain),
        running_with=running_with,
        merging_disabled=domainxml.merging_disabled(domain),
    )


def change(dom: libvirt.virDomain, value: PageFusion) -> bool:
    """Set page fusion on a shut-off domain; return True if its definition changed."""
    name = dom.name()
    if not connection.is_shut_off(dom):
        raise RuleError(
            f"domain {name!r} is {connection.state_name(dom)}: page fusion can only be changed"
            f" while the domain is shut off; shut it down first ('virsh shutdown {name}')"
        )

    xml, changed = domainxml.with_page_fusion(dom.XMLDesc(INACTIVE_XML), value)
    if changed:
        dom.connect().defineXML(xml)
        log.info("domain %r: page fusion set to %s", name, value.describe())
    ledger.accept(dom.UUIDString(), name, value, confirmed=True)
    return changed
