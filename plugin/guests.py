"""Small demo guests: defined from a template, booted, awaited, removed.

They are ``type='qemu'`` (TCG) domains so that they run on any host, nested
or not, and boot in a few seconds from the image in ``guestimage``.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2
import libvirt

from pagefusion import domainxml, element, guestimage
from pagefusion.element import PageFusion
from pagefusion.errors import HostError

log = logging.getLogger(__name__)

CONSOLE_DIR = Path("/var/log/libvirt/qemu")
BOOT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GuestSpec:
    name: str
    page_fusion: PageFusion
    memory_mib: int = 128
    unique_mib: int = 4
    volatile_mib: int = 1

    @property
    def console_log(self) -> Path:
        return CONSOLE_DIR / f"{self.name}.console.log"


def _template() -> jinja2.Template:
    source = importlib.resources.files("pagefusion.templates").joinpath("guest.xml.j2")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(source.read_text())


def domain_xml(spec: GuestSpec, image: guestimage.GuestImage) -> str:
    """The domain XML of a demo guest, with its page-fusion setting applied."""
    rendered = _template().render(
        name=spec.name,
        memory_mib=spec.memory_mib,
        unique_mib=spec.unique_mib,
        volatile_mib=spec.volatile_mib,
        image=image,
        console_log=spec.console_log,
    )
    xml, _changed = domainxml.with_page_fusion(rendered, spec.page_fusion)
    return xml


def define(conn: libvirt.virConnect, spec: GuestSpec, image: guestimage.GuestImage):
    with contextlib.suppress(FileNotFoundError):
        spec.console_log.unlink()
    return conn.defineXML(domain_xml(spec, image))


def wait_until_booted(spec: GuestSpec, timeout_s: float = BOOT_TIMEOUT_S) -> float:
    """Wait until the guest's console says it is ready; return seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if guestimage.READY_LINE in spec.console_log.read_text(errors="replace"):
                return time.monotonic() - started
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    raise HostError(
        f"guest {spec.name!r} did not boot within {timeout_s:.0f} s; see {spec.console_log}"
    )


def remove(conn: libvirt.virConnect, name: str) -> None:
    """Destroy and undefine a guest if it exists; never raises for a missing one."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    with contextlib.suppress(FileNotFoundError):
        (CONSOLE_DIR / f"{name}.console.log").unlink()


def page_fusion_of(dom: libvirt.virDomain, flags: int = 0) -> PageFusion:
    return element.from_domain(element.parse_domain(dom.XMLDesc(flags)))
