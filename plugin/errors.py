"""The one exception hierarchy of pagefusion.

Errors a user sees name the domain or path, quote the value and say how to fix
it; the CLI and the hook print ``str(error)`` as a single line.
"""


class PagefusionError(Exception):
    """Root of every error pagefusion raises on purpose."""


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
