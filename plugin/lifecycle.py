"""What pagefusion does at each step of a domain's life, as the qemu hook sees it.

Each ``on_*`` function takes one hook call. ``prepare``, ``migrate`` and
``restore`` raise PagefusionError to refuse; the others are told by the hook
that their errors are warnings. None of them may call libvirt.
"""

from __future__ import annotations

import functools
import logging
import shlex
import time
from dataclasses import dataclass

from lxml import etree

from pagefusion import config, domainxml, element, ksm, ledger, paths, runstate, supervision
from pagefusion.element import PageFusion
from pagefusion.errors import HostError, PagefusionError, RuleError

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


def set_command(name: str, state: str) -> str:
    """The command that changes a domain's setting, quoted for a shell."""
    return f'"pagefusion set {shlex.quote(name)} {state}"'


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
            f" forbids merging; run {set_command(call.name, 'on')} to make them agree"
        )
    if not value.enabled and not domainxml.merging_disabled(call.domain):
        raise RuleError(
            f"domain {call.name!r} has page fusion off but its memory is mergeable (no"
            f" <memoryBacking><nosharepages/>); run {set_command(call.name, 'off')}"
            f" to isolate it, or {set_command(call.name, 'on')} to fuse it"
        )


# A record still "prepared" after this long belongs to a start that died.
PREPARE_STALE_S = 600.0
# A hook waits this long at most for another hook's host-wide decision.
HOST_LOCK_TIMEOUT_S = 20.0


def _is_live(record: runstate.DomainRecord) -> bool:
    if record.phase == runstate.PHASE_PREPARED:
        return time.time() - record.since < PREPARE_STALE_S
    return record.phase == runstate.PHASE_RUNNING and record.qemu_alive()


def check_group(call: HookCall) -> None:
    """Refuse a page-fusion domain whose group differs from running ones'.

    KSM merges across the whole host, so two groups on one host would be
    fused together. Called under the host lock, so that of two domains
    prepared at the same moment the second sees the first.
    """
    value = call.page_fusion
    if not value.enabled:
        return
    others = [
        r for r in runstate.all_records() if r.uuid != call.uuid and r.enabled and _is_live(r)
    ]
    conflicting = [r for r in others if r.page_fusion.effective_group != value.effective_group]
    if conflicting:
        group = conflicting[0].page_fusion.effective_group
        names = ", ".join(repr(r.name) for r in conflicting)
        raise RuleError(
            f"domain {call.name!r} is in page-fusion group {value.effective_group!r}, but"
            f" {names} of group {group!r} already run on this host and KSM would fuse"
            " them together; stop those first or give this domain the same group"
        )


def check_slipped_change(call: HookCall) -> None:
    """Refuse a start that would silently apply a change made while it ran."""
    entry = ledger.load(call.uuid)
    if not entry.slipped:
        return
    if call.page_fusion != entry.slipped_to:
        try:
            ledger.accept(call.uuid, call.name, call.page_fusion, confirmed=False)
        except OSError as err:
            log.warning("domain %r: could not settle the slipped change: %s", call.name, err)
        return
    wanted = entry.slipped_to.state
    kept = entry.slipped_from.state if entry.slipped_from else "off"
    raise RuleError(
        f"domain {call.name!r}: page fusion was changed from {entry.slipped_from.describe()}"
        f" to {entry.slipped_to.describe()} while the domain was running, and nothing undid"
        f" it; to start with it, run {set_command(call.name, wanted)}, or to keep the"
        f" old value run {set_command(call.name, kept)}, then start again"
    )


def check_ksm(call: HookCall) -> None:
    """Apply the configured policy to a page-fusion domain on a host without usable KSM."""
    if ksm.writable():
        return
    reason = "read-only" if ksm.available() else "missing (no CONFIG_KSM in the kernel)"
    if config.load().ksm_unavailable == "allow":
        log.warning("domain %r starts unfused: KSM is %s", call.name, reason)
        return
    raise RuleError(
        f"domain {call.name!r} has page fusion on, but KSM is {reason} on this host"
        f" ({ksm.SYSFS}); start it with page fusion off ({set_command(call.name, 'off')}),"
        f" or set 'unavailable = allow' under [ksm] in {config.CONFIG_PATH} to run it unfused"
    )


def _record(call: HookCall) -> runstate.DomainRecord:
    value = call.page_fusion
    return runstate.DomainRecord(
        name=call.name, uuid=call.uuid, enabled=value.enabled, group=value.group
    )


def on_prepare(call: HookCall) -> None:
    value = call.page_fusion
    check_slipped_change(call)
    check_merge_setting(call)

    if not value.enabled:
        # Fails open: a domain kept out of merging is safe whatever happens
        # to pagefusion's state directory.
        try:
            runstate.save(_record(call))
        except OSError as err:
            log.warning("domain %r starts unrecorded: %s", call.name, err)
        return

    check_ksm(call)
    # Fails closed: without its record the group rule cannot be kept.
    try:
        with runstate.host_lock(timeout_s=HOST_LOCK_TIMEOUT_S):
            check_group(call)
            runstate.save(_record(call))
    except (OSError, HostError) as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise RuleError(
            f"domain {call.name!r} has page fusion on, but pagefusion cannot record it in"
            f" {paths.RUN_DIR} ({detail}), so the page-fusion group rule cannot be kept;"
            f" free space in or fix {paths.RUN_DIR}, or start the domain with page fusion off"
        ) from None
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
    log.debug("domain %r running as QEMU pid %s", call.name, record.qemu_pid)
    if record.enabled:
        ksm.ensure_running()
        if supervision.worker_pid(record.uuid) is None:
            supervision.launch(record.uuid)


def on_stopped(call: HookCall) -> None:
    record = runstate.load(call.uuid)
    if record is not None:
        record.phase = runstate.PHASE_STOPPED
        runstate.save(record)
    supervision.stop(call.uuid)


def _persistent_value(name: str) -> PageFusion | None:
    """The element in libvirt's own file for the domain, read without libvirt."""
    try:
        text = paths.persistent_definition(name).read_bytes()
        return element.from_domain(element.parse_domain(text))
    except (OSError, PagefusionError):
        return None


def on_release(call: HookCall) -> None:
    record = runstate.load(call.uuid)
    ran_with = record.page_fusion if record else call.page_fusion
    entry = ledger.load(call.uuid)
    entry.name = call.name
    entry.ran_with = ran_with

    # A change made to the persistent definition while the domain ran is
    # normally undone at once by the daemon; if the daemon was down it is
    # still there, and the next start must not apply it silently.
    persistent = _persistent_value(call.name)
    if persistent is not None and persistent not in (ran_with, entry.accepted):
        entry.slipped_from, entry.slipped_to = ran_with, persistent
        log.warning(
            "domain %r: page fusion changed from %s to %s while it ran; the next start"
            " waits for 'pagefusion set'",
            call.name,
            ran_with.describe(),
            persistent.describe(),
        )
    ledger.save(entry)
    supervision.stop(call.uuid)
    runstate.remove(call.uuid)


def on_migrate(call: HookCall) -> str:
    # The source host runs no hook, but its daemon stamped the live XML, which
    # the migration carries, with the value the guest runs with.
    ran_with = element.stamp_from_domain(call.domain)
    if ran_with is None:
        # TODO(migration): a guest from a host whose daemon never stamped it
        # (pagefusion absent there, or its daemon down since the guest
        # started) is checked only against its own merge setting.
        log.warning(
            "domain %r arrives without a record of the page fusion it ran with;"
            " accepting page fusion %s",
            call.name,
            call.page_fusion.describe(),
        )
    elif call.page_fusion != ran_with:
        raise RuleError(
            f"domain {call.name!r} runs with page fusion {ran_with.describe()} on the"
            f" source host, but the incoming XML says {call.page_fusion.describe()};"
            " migrate it with the XML it runs with, and change page fusion while it is"
            " shut off"
        )
    check_merge_setting(call)
    return ""


def on_restore(call: HookCall) -> str:
    # This host's ledger knows what the guest was saved with; a state saved
    # elsewhere carries the running stamp of its live XML.
    ran_with = ledger.load(call.uuid).ran_with or element.stamp_from_domain(call.domain)
    if ran_with is not None and call.page_fusion != ran_with:
        raise RuleError(
            f"domain {call.name!r} was saved while running with page fusion"
            f" {ran_with.describe()}, but the XML to restore says"
            f" {call.page_fusion.describe()}; restore it with the saved XML, or discard the"
            " saved state and start it afresh to apply the change"
        )
    check_merge_setting(call)
    return ""


def on_reconnect(call: HookCall) -> None:
    # libvirtd restarted and found the domain running: bring the record up to
    # date; a failure here must never reach libvirt (it would kill the guest).
    on_started(call)


def on_attach(call: HookCall) -> None:
    on_started(call)
