"""The page-fusion element changes only while a domain is shut off, by any path.

A running guest and a shut-off domain are shared by the tests of this module;
each test changes the running guest's element by one path libvirt offers and
checks that the daemon put it back, kept the rest of the edit, and said so.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re

import libvirt
import pytest
import testbed

from pagefusion import domainxml, element, ledger
from pagefusion.element import NAMESPACE, STAMP_NAMESPACE, STAMP_PREFIX, PageFusion
from pagefusion.errors import ElementError
from pagefusion.settings import INACTIVE_XML

pytestmark = pytest.mark.libvirt

ON = PageFusion(enabled=True, group="pftest")
UNDO_WITHIN_S = 2.0


@pytest.fixture(scope="module")
def module_guests(libvirt_conn, guest_image):
    factory = testbed.GuestFactory(libvirt_conn, guest_image)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="module")
def running(module_guests, pf_daemon_process):
    spec = module_guests.spec(ON)
    return module_guests.boot(spec)


@pytest.fixture
def shut_off(guest_factory):
    return guest_factory.define(guest_factory.spec(PageFusion()))


def _value(xml: str) -> PageFusion | None:
    try:
        return element.from_domain(element.parse_domain(xml))
    except ElementError:
        return None


def persistent_value(dom) -> PageFusion | None:
    return _value(dom.XMLDesc(INACTIVE_XML))


def live_value(dom) -> PageFusion | None:
    return _value(dom.XMLDesc(0))


def _stamp(xml: str) -> PageFusion | None:
    try:
        return element.stamp_from_domain(element.parse_domain(xml))
    except ElementError:
        return None


def assert_undone(dom, daemon, before_log: int, refused: str, rejected_before: int) -> None:
    back = testbed.eventually(
        lambda: persistent_value(dom) == ON and live_value(dom) == ON, UNDO_WITHIN_S
    )
    assert back, f"not undone within {UNDO_WITHIN_S} s: {persistent_value(dom)}"
    warning = testbed.eventually(
        lambda: [
            line
            for line in daemon.log()[before_log:].splitlines()
            if line.startswith("WARNING") and repr(dom.name()) in line
        ],
        UNDO_WITHIN_S,
    )
    assert warning, daemon.log()[before_log:]
    assert "running with page fusion on (group 'pftest')" in warning[0]
    assert f"refused the change to {refused}" in warning[0]
    assert ledger.counters().get(ledger.REJECTED_CHANGES, 0) > rejected_before


def editor_script(tmp_path, sed_expression: str) -> dict[str, str]:
    script = tmp_path / "editor.sh"
    script.write_text(f'#!/bin/sh\nsed -i {sed_expression} "$1"\n')
    script.chmod(0o755)
    return {**os.environ, "EDITOR": str(script), "VISUAL": str(script)}


def test_virsh_edit_of_a_running_domain_is_undone_and_the_rest_kept(
    running, running_daemon, tmp_path
):
    mark, rejected = len(running_daemon.log()), ledger.counters().get(ledger.REJECTED_CHANGES, 0)
    env = editor_script(
        tmp_path,
        "-e 's/state=\"on\"/state=\"off\"/' -e 's|<on_crash>destroy|<on_crash>restart|'",
    )

    testbed.virsh("edit", running.name(), env=env)

    assert_undone(running, running_daemon, mark, "off", rejected)
    assert "<on_crash>restart</on_crash>" in running.XMLDesc(INACTIVE_XML)
    assert not domainxml.merging_disabled(element.parse_domain(running.XMLDesc(INACTIVE_XML)))


def test_virsh_define_of_a_running_domain_is_undone(running, running_daemon, tmp_path):
    mark, rejected = len(running_daemon.log()), ledger.counters().get(ledger.REJECTED_CHANGES, 0)
    edited, _ = domainxml.with_page_fusion(
        running.XMLDesc(INACTIVE_XML), PageFusion(enabled=True, group="elsewhere")
    )
    edited = edited.replace("<on_reboot>destroy", "<on_reboot>restart")
    path = tmp_path / "domain.xml"
    path.write_text(edited)

    testbed.virsh("define", str(path))

    assert_undone(running, running_daemon, mark, "on (group 'elsewhere')", rejected)
    assert "<on_reboot>restart</on_reboot>" in running.XMLDesc(INACTIVE_XML)


@pytest.mark.parametrize("where", ["--config", "--live"])
def test_virsh_metadata_on_a_running_domain_is_undone(running, running_daemon, where):
    mark, rejected = len(running_daemon.log()), ledger.counters().get(ledger.REJECTED_CHANGES, 0)

    testbed.virsh_set_metadata(running.name(), '<page-fusion state="off"/>', where)

    assert_undone(running, running_daemon, mark, "off", rejected)


def test_an_invalid_element_on_a_running_domain_is_replaced(running, running_daemon):
    mark, rejected = len(running_daemon.log()), ledger.counters().get(ledger.REJECTED_CHANGES, 0)

    testbed.virsh_set_metadata(running.name(), '<page-fusion state="sometimes"/>', "--config")

    assert_undone(running, running_daemon, mark, "an invalid element", rejected)


def test_the_daemon_stamps_the_running_value_into_the_live_xml_only(running, running_daemon):
    assert testbed.eventually(lambda: _stamp(running.XMLDesc(0)) == ON, UNDO_WITHIN_S)
    assert _stamp(running.XMLDesc(INACTIVE_XML)) is None


def test_a_forged_stamp_is_put_right_and_a_copied_one_removed(running, running_daemon, tmp_path):
    assert testbed.eventually(lambda: _stamp(running.XMLDesc(0)) == ON, UNDO_WITHIN_S)
    rejected = ledger.counters().get(ledger.REJECTED_CHANGES, 0)
    testbed.virsh(
        "metadata", running.name(), STAMP_NAMESPACE, "--live",
        "--key", STAMP_PREFIX, "--set", '<running state="off"/>',
    )  # fmt: skip
    assert testbed.eventually(lambda: _stamp(running.XMLDesc(0)) == ON, UNDO_WITHIN_S)

    # A dumped live XML defined again carries the stamp into the persistent
    # definition, where it would speak of a run that is over.
    dumped = tmp_path / "live.xml"
    dumped.write_text(running.XMLDesc(0))
    testbed.virsh("define", str(dumped))
    assert testbed.eventually(
        lambda: _stamp(running.XMLDesc(INACTIVE_XML)) is None, UNDO_WITHIN_S
    ), running.XMLDesc(INACTIVE_XML)
    assert persistent_value(running) == ON
    assert _stamp(running.XMLDesc(0)) == ON
    # Neither is a change of the element.
    assert ledger.counters().get(ledger.REJECTED_CHANGES, 0) == rejected


def test_cli_set_refuses_a_running_domain_and_changes_nothing(running, running_daemon):
    before = running.XMLDesc(INACTIVE_XML)

    done = testbed.cli("set", running.name(), "off")

    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"pagefusion: domain {running.name()!r} is running: page fusion can only be changed"
        f" while the domain is shut off; shut it down first ('virsh shutdown {running.name()}')"
    )
    assert running.XMLDesc(INACTIVE_XML) == before


def test_shut_off_changes_are_accepted_by_every_path(shut_off, running_daemon, tmp_path):
    name = shut_off.name()

    done = testbed.cli("set", name, "on", "--group", "pftest")
    assert done.returncode == 0, done.stderr
    assert persistent_value(shut_off) == ON

    env = editor_script(tmp_path, '-e \'s/state="on"/state="off"/\'')
    testbed.virsh("edit", name, env=env)
    # The daemon brings the merge setting in line with the element.
    consistent = testbed.eventually(
        lambda: domainxml.merging_disabled(element.parse_domain(shut_off.XMLDesc(INACTIVE_XML))),
        UNDO_WITHIN_S,
    )
    assert consistent
    assert persistent_value(shut_off) == PageFusion(enabled=False, group="pftest")

    testbed.virsh_set_metadata(name, '<page-fusion state="on" group="pftest"/>', "--config")
    merging = testbed.eventually(
        lambda: (
            not domainxml.merging_disabled(element.parse_domain(shut_off.XMLDesc(INACTIVE_XML)))
        ),
        UNDO_WITHIN_S,
    )
    assert merging
    assert persistent_value(shut_off) == ON

    # The last change takes effect at the next start: QEMU's memory is mergeable.
    shut_off.create()
    assert testbed.qemu_facts(name) == (False, True)
    shown = json.loads(testbed.cli("show", name, "--json", check=True).stdout)
    assert shown["running_with"] == {"state": "on", "group": "pftest"}


def test_the_setting_decides_whether_qemu_memory_is_mergeable(guest_factory, running):
    off = guest_factory.boot(guest_factory.spec(PageFusion()))

    assert testbed.qemu_facts(running.name()) == (False, True)
    assert testbed.qemu_facts(off.name()) == (True, False)


def test_show_reports_the_running_value(running):
    done = testbed.cli("show", running.name(), "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["state"] == "running"
    assert shown["running_with"] == {"state": "on", "group": "pftest"}
    assert shown["page_fusion"] == {"state": "on", "group": "pftest"}


def test_a_change_made_while_the_daemon_was_down_blocks_the_next_start(
    guest_factory, pf_daemon_process
):
    dom = guest_factory.boot(guest_factory.spec(ON))
    pf_daemon_process.stop()
    try:
        testbed.virsh_set_metadata(dom.name(), '<page-fusion state="off"/>', "--config")
        dom.destroy()

        refused = testbed.virsh("start", dom.name(), check=False)
        assert refused.returncode != 0
        assert (
            f"pagefusion: domain {dom.name()!r}: page fusion was changed from on (group"
            f" 'pftest') to off while the domain was running" in refused.stderr
        )
        assert f'"pagefusion set {dom.name()} off"' in refused.stderr
        assert persistent_value(dom) == PageFusion()  # the domain and its setting are kept

        done = testbed.cli("set", dom.name(), "off")
        assert done.returncode == 0, done.stderr
        testbed.virsh("start", dom.name())
        assert dom.isActive()
    finally:
        pf_daemon_process.start()


def test_restore_with_a_changed_element_is_refused(guest_factory, running_daemon, tmp_path):
    dom = guest_factory.boot(guest_factory.spec(ON))
    image = tmp_path / "saved.img"
    dom.save(str(image))
    changed = testbed.virsh("save-image-dumpxml", str(image)).stdout.replace(
        'state="on"', 'state="off"'
    )
    changed_path = tmp_path / "changed.xml"
    changed_path.write_text(changed)

    refused = testbed.virsh("restore", str(image), "--xml", str(changed_path), check=False)
    assert refused.returncode != 0
    assert "was saved while running with page fusion on (group 'pftest')" in refused.stderr
    assert not dom.isActive()

    testbed.virsh("restore", str(image))
    assert dom.isActive()


def test_managed_save_with_a_changed_element_is_refused(guest_factory, running_daemon, tmp_path):
    dom = guest_factory.boot(guest_factory.spec(ON))
    name = dom.name()
    testbed.virsh("managedsave", name)
    original = testbed.virsh("managedsave-dumpxml", name).stdout
    original_path, changed_path = tmp_path / "original.xml", tmp_path / "changed.xml"
    original_path.write_text(original)
    changed_path.write_text(original.replace('state="on"', 'state="off"'))
    testbed.virsh("managedsave-define", name, str(changed_path))

    refused = testbed.virsh("start", name, check=False)
    assert refused.returncode != 0
    assert "was saved while running with page fusion on (group 'pftest')" in refused.stderr
    assert not dom.isActive()

    # With the image's own XML put back, the guest resumes from it.
    testbed.virsh("managedsave-define", name, str(original_path))
    testbed.virsh("start", name)
    assert dom.isActive()


def page_fusion_xml(attributes: str, prefix: str = "pagefusion", namespace: str = NAMESPACE) -> str:
    return f'<{prefix}:page-fusion xmlns:{prefix}="{namespace}" {attributes}/>'


# case: (the element put in <metadata>, what the refusal must say). A repeated
# element cannot get here: libvirt keeps one element per metadata namespace
# (tests/unit/test_element.py covers it).
BAD_ELEMENTS = {
    "unknown state": (
        page_fusion_xml('state="sometimes"'),
        "page-fusion state 'sometimes' is not valid",
    ),
    "no state": (page_fusion_xml('group="lab"'), "has no 'state' attribute"),
    "other namespace": (
        page_fusion_xml('state="on"', "pf", "http://example.org/not-pagefusion"),
        "<page-fusion> in 'http://example.org/not-pagefusion' is not pagefusion's",
    ),
    "oversized group": (
        page_fusion_xml(f'state="on" group="{"g" * 300}"'),
        "invalid page-fusion group",
    ),
    "non-printable group": (
        page_fusion_xml('state="on" group="lab&#x200b;1"'),
        "invalid page-fusion group",
    ),
    "unknown attribute": (
        page_fusion_xml('state="on" colour="red"'),
        "invalid <pagefusion:page-fusion>",
    ),
}


@pytest.mark.parametrize("case", BAD_ELEMENTS)
def test_bad_elements_refuse_the_start_with_one_line(guest_factory, case):
    bad, reason = BAD_ELEMENTS[case]
    spec = guest_factory.spec(PageFusion())
    spec = type(spec)(f'{spec.name} "bad" ü', PageFusion())
    dom = guest_factory.define(spec)
    xml = re.sub(r"<([\w-]+:)?page-fusion [^>]*/>", lambda _m: bad, dom.XMLDesc(INACTIVE_XML))
    dom.connect().defineXML(xml)
    defined = dom.XMLDesc(INACTIVE_XML)

    refused = testbed.virsh("start", spec.name, check=False)

    assert refused.returncode != 0
    ours = [line for line in refused.stderr.splitlines() if "pagefusion:" in line]
    assert len(ours) == 1, refused.stderr
    assert f"pagefusion: domain {spec.name!r}" in ours[0] and reason in ours[0], ours[0]
    assert "Traceback" not in refused.stderr
    assert not dom.isActive()
    assert dom.XMLDesc(INACTIVE_XML) == defined  # nothing else altered


def test_domain_names_with_spaces_quotes_and_unicode_work(guest_factory):
    spec = guest_factory.spec(ON)
    spec = type(spec)(f'{spec.name} "quoted" ü', ON)
    dom = guest_factory.boot(spec)
    assert dom.isActive()
    assert testbed.qemu_facts(spec.name)[1] is True


def test_the_group_rule_refuses_a_second_group(guest_factory, running):
    other = guest_factory.define(guest_factory.spec(PageFusion(enabled=True, group="other")))

    refused = testbed.virsh("start", other.name(), check=False)

    assert refused.returncode != 0
    assert f"domain {other.name()!r} is in page-fusion group 'other'" in refused.stderr
    assert repr(running.name()) in refused.stderr
    with pytest.raises(libvirt.libvirtError):
        other.create()


def test_two_groups_starting_at_once_do_not_both_pass(guest_factory, running):
    # The module's running guest is of group 'pftest'; stop it so that the
    # two newcomers race for an empty host.
    running.destroy()
    try:
        a = guest_factory.define(guest_factory.spec(PageFusion(enabled=True, group="race-a")))
        b = guest_factory.define(guest_factory.spec(PageFusion(enabled=True, group="race-b")))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(lambda d: testbed.virsh("start", d.name(), check=False).returncode, [a, b])
            )
        assert sorted(results) != [0, 0]
        assert sum(1 for d in (a, b) if d.isActive()) == 1
    finally:
        for d in guest_factory.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            if d.name().startswith(testbed.TEST_PREFIX) and "race" in d.XMLDesc(0):
                d.destroy()
        running.create()
