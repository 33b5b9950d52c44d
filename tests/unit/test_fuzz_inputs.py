"""Property-based tests: whatever argv, XML or arguments come in, the answer is
one line, never a traceback, never a hang.

The hook is driven in-process with its state in a temporary directory; the
CLI runs against libvirt's built-in test driver (``test:///default``) and
only commands that change nothing on this host.
"""

from __future__ import annotations

import contextlib
import io
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagefusion import cli, element, hook
from pagefusion.element import NAMESPACE
from pagefusion.errors import ElementError

FUZZ = settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

names = st.text(min_size=0, max_size=40)
attribute_values = st.one_of(
    st.sampled_from(["on", "off", "", "ON", "maybe", "on ", "lab", "a b", "x" * 70]),
    st.text(alphabet=string.printable, max_size=20),
)


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


@st.composite
def page_fusion_elements(draw) -> str:
    namespace = draw(st.sampled_from([NAMESPACE, "http://example.org/other", ""]))
    prefix = draw(st.sampled_from(["pagefusion", "pf", ""]))
    attributes = draw(
        st.dictionaries(st.sampled_from(["state", "group", "size", "xmlns:x"]), attribute_values)
    )
    rendered = " ".join(f'{k}="{_escape(v)}"' for k, v in attributes.items() if k != "xmlns:x")
    tag = f"{prefix}:page-fusion" if prefix else "page-fusion"
    if prefix and namespace:
        declaration = f'xmlns:{prefix}="{namespace}"'
    elif namespace:
        declaration = f'xmlns="{namespace}"'
    else:
        declaration = ""
    body = draw(st.sampled_from(["", "<x/>", "text"]))
    if body:
        return f"<{tag} {declaration} {rendered}>{body}</{tag}>"
    return f"<{tag} {declaration} {rendered}/>"


@st.composite
def domain_documents(draw) -> str:
    name = _escape(draw(names))
    uuid = draw(st.sampled_from(["0d2b7c1e-5a4f-4c3e-9b1a-2f6e8d7c9a01", "", "not-a-uuid"]))
    elements = draw(st.lists(page_fusion_elements(), max_size=3))
    backing = draw(st.sampled_from(["", "<memoryBacking><nosharepages/></memoryBacking>"]))
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>"
        f"<metadata>{''.join(elements)}</metadata>{backing}</domain>"
    )


def xml_or_garbage():
    return st.one_of(domain_documents(), st.text(max_size=200), st.just(""))


def assert_one_line(message: str) -> None:
    assert "\n" not in message, message
    assert "Traceback" not in message


@FUZZ
@given(document=xml_or_garbage())
def test_the_element_parser_says_one_line_or_gives_a_value(document):
    try:
        value = element.from_domain(element.parse_domain(document))
    except ElementError as err:
        assert_one_line(str(err))
    else:
        assert value.state in ("on", "off")


@FUZZ
@given(
    argv=st.lists(st.text(max_size=30), max_size=6),
    operation=st.sampled_from(
        ["prepare", "start", "started", "stopped", "release", "migrate", "restore",
         "reconnect", "attach", "other"]
    ),
    document=xml_or_garbage(),
)  # fmt: skip
def test_the_hook_answers_every_call_in_one_line(private_paths, argv, operation, document):
    call = argv[:1] + [operation] + argv[1:]
    verdict, output = hook.run(call, document)
    assert output == ""
    assert_one_line(verdict.message)
    if operation not in hook.REFUSING_OPERATIONS:
        assert verdict.ok


@FUZZ
@given(argv=st.lists(st.text(max_size=25), max_size=5))
def test_the_hook_script_entry_point_never_raises(private_paths, argv):
    assert hook.main(argv, io.StringIO("<domain/>")) in (0, 1)


SAFE_COMMANDS = st.sampled_from(
    [["show"], ["set"], ["metrics", "list"], ["metrics", "query"], ["status"], ["--version"]]
)
arguments = st.lists(
    st.one_of(
        st.sampled_from(["on", "off", "test", "--group", "--json", "--samples", "--period", "-v"]),
        st.text(max_size=20),
    ),
    max_size=4,
)


@FUZZ
@given(command=SAFE_COMMANDS, extra=arguments)
def test_the_cli_fails_in_one_line(capsys, command, extra):
    argv = ["-c", "test:///default", *command, *extra]
    if "--samples" in extra or "--period" in extra:
        argv += ["--samples", "1"]  # keep every run short
    with contextlib.suppress(SystemExit):
        cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 1, err
    assert "Traceback" not in err
