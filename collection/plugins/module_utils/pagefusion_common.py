# Copyright: pagefusion contributors
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""What the pagefusion.libvirt modules share.

The modules run on the libvirt host under the interpreter that has the
``pagefusion`` package (its virtual environment, by default
``/opt/pagefusion/venv/bin/python``): they import the package and never
reimplement it. This file guards those imports, opens the libvirt
connection named by the ``uri`` option, and shapes values for results.
"""

from __future__ import annotations

import traceback

from ansible.module_utils.basic import missing_required_lib

# The names below are None when their import failed; every module calls
# check_imports() before it uses them.
try:
    import libvirt
except ImportError:
    libvirt = None
    HAS_LIBVIRT = False
    LIBVIRT_IMPORT_ERROR = traceback.format_exc()
else:
    HAS_LIBVIRT = True
    LIBVIRT_IMPORT_ERROR = None

try:
    import pagefusion

    # domainxml is not used here: the modules use it through this file.
    # pylint: disable-next=unused-import
    from pagefusion import connection, domainxml, element, metrics, settings
    from pagefusion.errors import PagefusionError
except ImportError:
    pagefusion = connection = domainxml = element = metrics = settings = None
    PagefusionError = None
    HAS_PAGEFUSION = False
    PAGEFUSION_IMPORT_ERROR = traceback.format_exc()
    DEFAULT_URI = "qemu:///system"
else:
    HAS_PAGEFUSION = True
    PAGEFUSION_IMPORT_ERROR = None
    DEFAULT_URI = connection.DEFAULT_URI

# Completes missing_required_lib's "This is required ...".
INTERPRETER_HINT = (
    "by the pagefusion.libvirt modules; run the task with ansible_python_interpreter set to"
    " the python of pagefusion's virtual environment (the host role's pagefusion_host_venv,"
    " by default /opt/pagefusion/venv/bin/python)"
)

# Keyword arguments for AnsibleModule's argument_spec: the options every
# module of the collection has.
URI_OPTION = {"uri": {"type": "str", "default": DEFAULT_URI}}


def check_imports(module) -> None:
    """Fail the task, saying what is missing and where, if an import failed."""
    if not HAS_LIBVIRT:
        module.fail_json(
            msg=missing_required_lib("libvirt-python", reason=INTERPRETER_HINT),
            exception=LIBVIRT_IMPORT_ERROR,
        )
    if not HAS_PAGEFUSION:
        module.fail_json(
            msg=missing_required_lib("pagefusion", reason=INTERPRETER_HINT),
            exception=PAGEFUSION_IMPORT_ERROR,
        )


def fail(module, err: Exception, **result) -> None:
    """Fail the task with pagefusion's or libvirt's one-line message."""
    if HAS_LIBVIRT and isinstance(err, libvirt.libvirtError):
        module.fail_json(msg=f"libvirt: {err.get_error_message()}", **result)
    module.fail_json(msg=str(err), **result)


def connect(module):
    """The libvirt connection named by the ``uri`` option; fails the task if none."""
    try:
        return connection.open_connection(module.params["uri"])
    except PagefusionError as err:
        fail(module, err)


def lookup_domain(module, conn, name: str):
    try:
        return connection.lookup_domain(conn, name)
    except PagefusionError as err:
        fail(module, err)


def page_fusion_value(value) -> dict | None:
    """A PageFusion as returned in results: ``{"state": "on", "group": "lab"}``."""
    if value is None:
        return None
    return {"state": value.state, "group": value.group}


def element_xml(domain_xml: str) -> str:
    """The page-fusion element of a domain definition as XML, or "" if it has none.

    This is what the diff shows: the element alone, before and after.
    """
    domain = element.parse_domain(domain_xml)
    found = element.find_element(domain)
    if found is None:
        return ""
    return element.PageFusion.from_element(found).to_xml() + "\n"


def read_setting(dom) -> dict:
    """One domain's setting as a result entry; an invalid element becomes an error entry."""
    try:
        return settings.read(dom).as_dict()
    except PagefusionError as err:
        return {"name": dom.name(), "uuid": dom.UUIDString(), "error": str(err)}


def all_settings(conn, names: list[str] | None = None) -> list[dict]:
    """The settings of every domain of ``conn`` (or of those named), shut off ones too."""
    domains = sorted(conn.listAllDomains(0), key=lambda dom: dom.name())
    if names:
        domains = [dom for dom in domains if dom.name() in names]
    return [read_setting(dom) for dom in domains]


def host_metrics(names: list[str] | None = None) -> dict:
    """The host's fused-memory figures in VirtualBox's names, as pagefusion gives them."""
    return metrics.collect(names).as_dict()


def pagefusion_version() -> str:
    return pagefusion.__version__
