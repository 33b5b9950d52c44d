"""Opening libvirt connections with errors a user can act on."""

from __future__ import annotations

import logging

import libvirt

from pagefusion.errors import HostError, PagefusionError

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"


def _quiet(_context: object, _error: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_quiet, None)


def open_connection(uri: str | None = None) -> libvirt.virConnect:
    uri = uri or DEFAULT_URI
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HostError(
            f"cannot connect to libvirt at {uri!r}: {err.get_error_message()}; is libvirtd running?"
        ) from None
    log.debug("connected to %s", uri)
    return conn


def lookup_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise PagefusionError(f"domain {name!r} not found at {conn.getURI()!r}") from None
        raise PagefusionError(
            f"cannot look up domain {name!r}: {err.get_error_message()}"
        ) from None


STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def state_name(dom: libvirt.virDomain) -> str:
    state, _reason = dom.state()
    return STATE_NAMES.get(state, f"state {state}")


def is_shut_off(dom: libvirt.virDomain) -> bool:
    return dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
