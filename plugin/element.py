"""The page-fusion element that a libvirt domain carries in its ``<metadata>``.

    <metadata>
      <pagefusion:page-fusion xmlns:pagefusion="http://pagefusion.org/xmlns/libvirt/page-fusion/1"
                              state="on" group="lab"/>
    </metadata>

``state`` is ``on`` or ``off``; ``group`` names the set of domains that may be
fused with each other. A domain without the element has page fusion off.

While a domain runs, the daemon also keeps a stamp of the value it runs with
in its live XML, in a namespace of its own so that no write to the element
touches it:

      <pagefusion-running:running
          xmlns:pagefusion-running="http://pagefusion.org/xmlns/libvirt/running/1"
          state="on" group="lab"/>

A migration carries the live XML, so the target host can compare the stamp
with the element the guest arrives with. Users never write the stamp.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagefusion.errors import ElementError

if TYPE_CHECKING:
    from lxml import etree


def _etree():
    # lxml is imported on first use: a fusion worker needs PageFusion but
    # never parses XML, and lxml would add megabytes to every worker.
    from lxml import etree

    return etree


log = logging.getLogger(__name__)

NAMESPACE = "http://pagefusion.org/xmlns/libvirt/page-fusion/1"
PREFIX = "pagefusion"
LOCAL_NAME = "page-fusion"
TAG = f"{{{NAMESPACE}}}{LOCAL_NAME}"

STAMP_NAMESPACE = "http://pagefusion.org/xmlns/libvirt/running/1"
STAMP_PREFIX = "pagefusion-running"
STAMP_LOCAL_NAME = "running"
STAMP_TAG = f"{{{STAMP_NAMESPACE}}}{STAMP_LOCAL_NAME}"

GROUP_MAX_CHARS = 64
GROUP_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_GROUP = "default"


@functools.cache
def _schema() -> etree.RelaxNG:
    etree = _etree()
    text = importlib.resources.files("pagefusion.schema").joinpath("page-fusion.rng").read_bytes()
    return etree.RelaxNG(etree.fromstring(text))


def one_line(text: str) -> str:
    """Messages from libxml2 may span lines; ours never do."""
    return " ".join(text.split())


def check_group(group: str) -> str:
    """Return ``group`` if it is a valid group name, else raise ElementError."""
    if not GROUP_PATTERN.fullmatch(group):
        shown = group if len(group) <= GROUP_MAX_CHARS else group[:GROUP_MAX_CHARS] + "..."
        raise ElementError(
            f"invalid page-fusion group {shown!r}: use 1 to {GROUP_MAX_CHARS} characters"
            " of letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return group


@dataclass(frozen=True)
class PageFusion:
    """The value of one domain's page-fusion element."""

    enabled: bool = False
    group: str | None = None

    @property
    def state(self) -> str:
        return "on" if self.enabled else "off"

    @property
    def effective_group(self) -> str:
        """The group a running domain is fused in; domains without one share a group."""
        return self.group or DEFAULT_GROUP

    def describe(self) -> str:
        """Short text for messages: ``on (group 'lab')``, ``off``."""
        if self.group:
            return f"{self.state} (group {self.group!r})"
        return self.state

    @classmethod
    def from_element(cls, element: etree._Element, *, domain: str = "?") -> PageFusion:
        """Build the value from a ``<pagefusion:page-fusion>`` element (or the
        running stamp, which has the same attributes), validating it."""
        stamp = element.tag == STAMP_TAG
        shown = f"{STAMP_PREFIX}:{STAMP_LOCAL_NAME}" if stamp else f"{PREFIX}:{LOCAL_NAME}"
        state = element.get("state")
        if state is None:
            raise ElementError(
                f"domain {domain!r}: <{shown}> has no 'state' attribute;"
                " set state='on' or state='off'"
            )
        if state not in ("on", "off"):
            raise ElementError(
                f"domain {domain!r}: page-fusion state {state!r} is not valid; use 'on' or 'off'"
            )
        group = element.get("group")
        if group is not None:
            try:
                check_group(group)
            except ElementError as err:
                raise ElementError(f"domain {domain!r}: {err}") from None

        schema = _schema()
        if not schema.validate(element):
            first = one_line(schema.error_log.filter_from_errors()[0].message)
            raise ElementError(f"domain {domain!r}: invalid <{shown}>: {first}")
        return cls(enabled=state == "on", group=group)

    def to_element(self) -> etree._Element:
        etree = _etree()
        element = etree.Element(TAG, nsmap={PREFIX: NAMESPACE})
        element.set("state", self.state)
        if self.group is not None:
            element.set("group", check_group(self.group))
        return element

    def to_xml(self) -> str:
        """The element alone, with its namespace declaration."""
        return _etree().tostring(self.to_element(), encoding="unicode")

    def to_metadata_xml(self, local_name: str = LOCAL_NAME) -> str:
        """The element (or with ``STAMP_LOCAL_NAME``, the stamp) without namespace, as
        virDomainSetMetadata and ``virsh metadata`` take it: libvirt adds the
        namespace from its ``uri`` and ``key`` arguments."""
        group = f' group="{self.group}"' if self.group is not None else ""
        return f'<{local_name} state="{self.state}"{group}/>'


OFF = PageFusion()


def _only_child(domain: etree._Element, tag: str, shown: str) -> etree._Element | None:
    """The one ``<metadata>`` child with ``tag``, or None; ElementError if repeated."""
    metadata = domain.find("metadata")
    found = [] if metadata is None else [child for child in metadata if child.tag == tag]
    if len(found) > 1:
        raise ElementError(
            f"domain {domain_name(domain)!r}: <{shown}> appears {len(found)} times in"
            " <metadata>; keep exactly one"
        )
    return found[0] if found else None


def find_element(domain: etree._Element) -> etree._Element | None:
    """Return the page-fusion element of a ``<domain>`` tree, or None if it has none.

    Raises ElementError when the element is repeated or when an element of the
    same name sits in another namespace, which is almost always a typo that
    would otherwise leave page fusion silently off.
    """
    ours = _only_child(domain, TAG, f"{PREFIX}:{LOCAL_NAME}")
    if ours is not None:
        return ours
    metadata = domain.find("metadata")
    for child in metadata if metadata is not None else ():
        if isinstance(child.tag, str) and _etree().QName(child).localname == LOCAL_NAME:
            found = _etree().QName(child).namespace or "no namespace"
            raise ElementError(
                f"domain {domain_name(domain)!r}: <{LOCAL_NAME}> in {found!r} is not"
                f" pagefusion's; use the namespace {NAMESPACE!r}"
            )
    return None


def parse_domain(domain_xml: str | bytes) -> etree._Element:
    """Parse a domain XML document, turning parse errors into ElementError."""
    etree = _etree()
    if isinstance(domain_xml, str):
        domain_xml = domain_xml.encode()
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        root = etree.fromstring(domain_xml, parser)
    except etree.XMLSyntaxError as err:
        raise ElementError(f"domain XML is not well-formed: {one_line(str(err))}") from None
    if root.tag != "domain":
        raise ElementError(f"expected a <domain> document, found <{root.tag}>")
    return root


def domain_name(domain: etree._Element) -> str:
    return domain.findtext("name") or "?"


def from_domain(domain: etree._Element) -> PageFusion:
    """The page-fusion setting of a parsed ``<domain>``; absent means off."""
    name = domain_name(domain)
    element = find_element(domain)
    if element is None:
        return OFF
    return PageFusion.from_element(element, domain=name)


def stamp_from_domain(domain: etree._Element) -> PageFusion | None:
    """The running stamp of a parsed ``<domain>``, or None if it carries none."""
    stamp = _only_child(domain, STAMP_TAG, f"{STAMP_PREFIX}:{STAMP_LOCAL_NAME}")
    return None if stamp is None else PageFusion.from_element(stamp, domain=domain_name(domain))
