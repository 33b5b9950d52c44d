"""Edits of a libvirt domain definition that pagefusion makes.

pagefusion writes exactly two things into a domain's XML: its page-fusion
element in ``<metadata>``, and ``<memoryBacking><nosharepages/>``, which tells
QEMU ``mem-merge=off`` so that KSM never merges a domain that has page fusion
off. Everything else (comments, other metadata, formatting) is left as it was.
"""

from __future__ import annotations

import logging

from lxml import etree

from pagefusion import element, textedit
from pagefusion.element import PageFusion
from pagefusion.errors import ElementError

log = logging.getLogger(__name__)

# Where libvirt itself puts these elements when it formats a domain; a new
# element goes after the last of these that the domain has.
_METADATA_AFTER = ("name", "uuid", "genid", "title", "description")
_MEMORY_BACKING_AFTER = ("maxMemory", "memory", "currentMemory", "blkiotune", "memtune")


def merging_disabled(domain: etree._Element) -> bool:
    """True if the domain runs with ``mem-merge=off`` (``<nosharepages/>``)."""
    return domain.find("memoryBacking/nosharepages") is not None


def consistent(domain: etree._Element) -> bool:
    """True if the merge setting matches the page-fusion element."""
    return element.from_domain(domain).enabled != merging_disabled(domain)


def _indent_of(parent: etree._Element) -> tuple[str, str]:
    """Whitespace before a child of ``parent`` and before its closing tag."""
    child_indent = "\n  "
    if len(parent) and parent.text and parent.text.strip() == "":
        child_indent = parent.text
    elif parent.text is None and len(parent) == 0:
        # Derive from the parent's own indentation, one step deeper.
        own = parent.getprevious().tail if parent.getprevious() is not None else None
        if own is None and parent.getparent() is not None:
            own = parent.getparent().text
        if own is not None and own.strip() == "":
            child_indent = own + "  "
    closing = child_indent[:-2] if child_indent.endswith("  ") else "\n"
    return child_indent, closing


def _append(parent: etree._Element, child: etree._Element) -> None:
    """Append ``child`` as the last child of ``parent`` with matching indentation."""
    child_indent, closing = _indent_of(parent)
    if len(parent):
        last = parent[-1]
        child.tail = last.tail
        last.tail = child_indent
    else:
        parent.text = child_indent
        child.tail = closing
    parent.append(child)


def _ensure_child(domain: etree._Element, tag: str, after: tuple[str, ...]) -> etree._Element:
    """Return the ``tag`` child of ``domain``, creating it in libvirt's position."""
    found = domain.find(tag)
    if found is not None:
        return found

    created = etree.Element(tag)
    anchor = None
    for child in domain:
        if child.tag in after:
            anchor = child
    if anchor is None:
        _append(domain, created)
        return created
    created.tail = anchor.tail
    anchor.addnext(created)
    return created


def _remove(node: etree._Element) -> None:
    """Remove ``node`` and the whitespace that introduced it."""
    parent = node.getparent()
    previous = node.getprevious()
    if previous is not None:
        previous.tail = node.tail
    else:
        parent.text = node.tail if len(parent) > 1 else None
    parent.remove(node)


def set_page_fusion(domain: etree._Element, value: PageFusion) -> bool:
    """Write ``value`` into a parsed domain; return True if anything changed."""
    changed = False
    name = element.domain_name(domain)

    current = element.find_element(domain)
    if current is None:
        metadata = _ensure_child(domain, "metadata", _METADATA_AFTER)
        _append(metadata, value.to_element())
        changed = True
    elif PageFusion.from_element(current, domain=name) != value:
        # Attributes change in place so that the element keeps its position
        # and the prefix the user gave it.
        current.set("state", value.state)
        if value.group is None:
            current.attrib.pop("group", None)
        else:
            current.set("group", value.group)
        changed = True

    changed |= set_merging(domain, enabled=value.enabled)
    log.debug("domain %r: page fusion set to %s, changed=%s", name, value.describe(), changed)
    return changed


def set_merging(domain: etree._Element, *, enabled: bool) -> bool:
    """Add or remove ``<nosharepages/>``; return True if anything changed."""
    if merging_disabled(domain) != enabled:
        return False

    if enabled:
        backing = domain.find("memoryBacking")
        _remove(backing.find("nosharepages"))
        if len(backing) == 0 and not backing.attrib:
            _remove(backing)
        return True

    backing = _ensure_child(domain, "memoryBacking", _MEMORY_BACKING_AFTER)
    _append(backing, etree.Element("nosharepages"))
    return True


def to_string(domain: etree._Element) -> str:
    return etree.tostring(domain, encoding="unicode")


def _canonical(xml: str | etree._Element) -> str:
    if not isinstance(xml, str):
        xml = to_string(xml)
    return etree.canonicalize(xml, strip_text=True, with_comments=True)


def drop_elements(domain: etree._Element) -> bool:
    """Remove every page-fusion element, valid or not; True if there was one."""
    found = domain.findall(f"metadata/{element.TAG}")
    for node in found:
        _remove(node)
    return bool(found)


def with_page_fusion(
    domain_xml: str, value: PageFusion, *, replace_invalid: bool = False
) -> tuple[str, bool]:
    """Return ``domain_xml`` rewritten to carry ``value``, and whether it changed.

    The edit is made on the parsed tree, which is the truth, and then spliced
    into the original text so that quoting, indentation and everything else
    stay byte for byte. If the splice does not give the same tree (an unusual
    layout), the tree is serialised instead: still correct, less tidy.
    ``replace_invalid`` first drops an invalid or repeated element instead of
    raising ElementError.
    """
    domain = element.parse_domain(domain_xml)
    dropped = False
    if replace_invalid:
        try:
            element.from_domain(domain)
        except ElementError:
            dropped = drop_elements(domain)
    changed = set_page_fusion(domain, value) or dropped
    if not changed:
        return domain_xml, False

    spliced = textedit.splice(domain_xml, value)
    if spliced is not None and _canonical(spliced) == _canonical(domain):
        return spliced, True
    log.debug("domain %r: text splice did not match, serialising the tree", value)
    return to_string(domain), True
