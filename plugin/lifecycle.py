"""What pagefusion does at each step of a domain's life, as the qemu hook sees it.

Each ``on_*`` function takes one hook call. ``prepare``, ``migrate`` and
``restore`` raise PagefusionError to refuse; the others are told by the hook
that their errors are warnings. None of them may call libvirt.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from lxml import etree

from pagefusion import domainxml, element, ksm, runstate
from pagefusion.element import PageFusion
from pagefusion.errors import RuleError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HookCall:
    name: str
    operation: str
    sub_operation: str
    domain_xml: str

    @functools.cached_property
    def domain(self) -> etree._Element:
        return element.parse_domain(self.domain_xml)

    @property
    def uuid(self) -> str:
        return self.domain.findtext("uuid") or self.name

    @functools.cached_property
    def page_fusion(self) -> PageFusion:
        return element.from_domain(self.domain)


def check_merge_setting(call: HookCall) -> None:
    """Refuse a domain whose merge setting contradicts its page-fusion element.

    A domain with page fusion off that QEMU marks mergeable would be fused
    with others behind its owner's back; one with page fusion on and
    ``<nosharepages/>`` would silently save nothing.
    """
    value = call.page_fusion
    if value.enabled and domainxml.merging_disabled(call.domain):
        raise RuleError(
            f"domain {call.name!r} has page fusion on but <memoryBacking><nosharepages/>"
            f" forbids merging; run 'pagefusion set {call.name} on' to make them agree"
        )
    if not value.enabled and not domainxml.merging_disabled(call.domain):
        raise RuleError(
            f"domain {call.name!r} has page fusion off but its memory is mergeable (no"
            f" <memoryBacking><nosharepages/>); run 'pagefusion set {call.name} off'"
            " to isolate it, or 'pagefusion set ... on' to fuse it"
        )


def on_prepare(call: HookCall) -> None:
    value = call.page_fusion
    check_merge_setting(call)

    with runstate.host_lock():
        record = runstate.DomainRecord(
            name=call.name, uuid=call.uuid, enabled=value.enabled, group=value.group
        )
        runstate.save(record)
    log.debug("domain %r prepared with page fusion %s", call.name, value.describe())


def on_start(call: HookCall) -> None:
    log.debug("domain %r: QEMU about to start", call.name)


def on_started(call: HookCall) -> None:
    record = runstate.load(call.uuid) or runstate.DomainRecord(
        name=call.name,
        uuid=call.uuid,
        enabled=call.page_fusion.enabled,
        group=call.page_fusion.group,
    )
    record.phase = runstate.PHASE_RUNNING
    record.qemu_pid = runstate.qemu_pid_of(call.name)
    runstate.save(record)
    if record.enabled:
        ksm.ensure_running()
    log.debug("domain %r running as QEMU pid %s", call.name, record.qemu_pid)


def on_stopped(call: HookCall) -> None:
    record = runstate.load(call.uuid)
    if record is not None:
        record.phase = runstate.PHASE_STOPPED
        runstate.save(record)


def on_release(call: HookCall) -> None:
    runstate.remove(call.uuid)


def on_migrate(call: HookCall) -> str:
    check_merge_setting(call)
    return ""


def on_restore(call: HookCall) -> str:
    check_merge_setting(call)
    return ""


def on_reconnect(call: HookCall) -> None:
    # libvirtd restarted and found the domain running: bring the record up to
    # date; a failure here must never reach libvirt (it would kill the guest).
    on_started(call)


def on_attach(call: HookCall) -> None:
    on_started(call)
