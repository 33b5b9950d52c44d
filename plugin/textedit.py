"""Line-level edits of domain XML text that keep the rest byte for byte.

libvirt writes one element per line, attributes in single quotes; lxml would
rewrite every attribute in double quotes. These splices make the same change
as ``domainxml`` makes on the tree, in the original text. Each returns None
when the text is not laid out as expected; ``domainxml`` checks the result
against the tree in any case.
"""

from __future__ import annotations

import re

from pagefusion.element import LOCAL_NAME, NAMESPACE, PageFusion

_STEP = "  "


def _element_text(value: PageFusion, prefix: str | None, quote: str = '"') -> str:
    tag = f"{prefix}:{LOCAL_NAME}" if prefix else LOCAL_NAME
    xmlns = f"xmlns:{prefix}" if prefix else "xmlns"
    attrs = [(xmlns, NAMESPACE), ("state", value.state)]
    if value.group is not None:
        attrs.append(("group", value.group))
    rendered = " ".join(f"{name}={quote}{text}{quote}" for name, text in attrs)
    return f"<{tag} {rendered}/>"


def _one(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = list(pattern.finditer(text))
    return found[0] if len(found) == 1 else None


def _line_indent(text: str, pos: int) -> str:
    start = text.rfind("\n", 0, pos) + 1
    return re.match(r"[ \t]*", text[start:]).group(0)


def _insert_before_close(text: str, tag: str, line: str) -> str | None:
    """Put ``line`` as the last child of the single ``<tag>`` element."""
    close = _one(re.compile(rf"^([ \t]*)</{tag}>", re.M), text)
    if close is not None:
        indent = close.group(1)
        return text[: close.start()] + f"{indent}{_STEP}{line}\n" + text[close.start() :]
    empty = _one(re.compile(rf"<{tag}\s*/>"), text)
    if empty is not None:
        indent = _line_indent(text, empty.start())
        block = f"<{tag}>\n{indent}{_STEP}{line}\n{indent}</{tag}>"
        return text[: empty.start()] + block + text[empty.end() :]
    return None


def _insert_block_after(text: str, anchors: tuple[str, ...], tag: str, line: str) -> str | None:
    """Add ``<tag>line</tag>`` as a new child of <domain>, after the last anchor."""
    best = None
    for anchor in anchors:
        found = _one(re.compile(rf"^([ \t]*)<{anchor}\b[^\n]*</{anchor}>[ \t]*\n", re.M), text)
        if found is not None and (best is None or found.end() > best.end()):
            best = found
    if best is None:
        return None
    indent = best.group(1)
    block = f"{indent}<{tag}>\n{indent}{_STEP}{line}\n{indent}</{tag}>\n"
    return text[: best.end()] + block + text[best.end() :]


def _splice_element(text: str, value: PageFusion) -> str | None:
    pattern = re.compile(
        rf"<(?:([\w.-]+):)?{LOCAL_NAME}\b[^>]*?(?:/>|>\s*</(?:[\w.-]+:)?{LOCAL_NAME}>)"
    )
    current = _one(pattern, text)
    if current is not None:
        quote = "'" if "='" in current.group(0) else '"'
        replacement = _element_text(value, current.group(1), quote)
        return text[: current.start()] + replacement + text[current.end() :]

    line = _element_text(value, "pagefusion")
    inserted = _insert_before_close(text, "metadata", line)
    if inserted is not None:
        return inserted
    return _insert_block_after(
        text, ("name", "uuid", "genid", "title", "description"), "metadata", line
    )


def _splice_merging(text: str, enabled: bool) -> str | None:
    nosharepages = re.compile(r"<nosharepages\s*/>")
    present = nosharepages.search(text) is not None
    if present != enabled:
        return text
    if not enabled:
        inserted = _insert_before_close(text, "memoryBacking", "<nosharepages/>")
        if inserted is not None:
            return inserted
        anchors = ("maxMemory", "memory", "currentMemory")
        return _insert_block_after(text, anchors, "memoryBacking", "<nosharepages/>")

    line = _one(re.compile(r"^[ \t]*<nosharepages\s*/>[ \t]*\n", re.M), text)
    if line is None:
        return None
    text = text[: line.start()] + text[line.end() :]
    emptied = re.compile(r"^[ \t]*<memoryBacking>\s*</memoryBacking>[ \t]*\n", re.M)
    return emptied.sub("", text, count=1)


def splice(text: str, value: PageFusion) -> str | None:
    """``text`` with the page-fusion element and the merge setting set to ``value``."""
    edited = _splice_element(text, value)
    if edited is None:
        return None
    return _splice_merging(edited, value.enabled)
