"""The one exception hierarchy of pagefusion.

Errors a user sees name the domain or path, quote the value and say how to fix
it; the CLI and the hook print ``str(error)`` as a single line.
"""


def single_line(text: str) -> str:
    """``text`` with unprintable characters (line breaks among them) escaped: a
    domain name or an argument may hold one, and a message stays one line."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


class PagefusionError(Exception):
    """Root of every error pagefusion raises on purpose; its message is one line."""

    def __init__(self, message: str = "") -> None:
        super().__init__(single_line(str(message)))


class ElementError(PagefusionError):
    """The page-fusion element of a domain is malformed or invalid."""


class RuleError(PagefusionError):
    """A change or a start breaks a page-fusion rule (shut-off rule, groups)."""


class HostError(PagefusionError):
    """The host is not fit: KSM, libvirtd, the hook or the state directory."""


class NativeError(PagefusionError):
    """The native fusion core returned an error."""


class DomainGoneError(PagefusionError):
    """The QEMU process of a domain went away while it was being read."""
