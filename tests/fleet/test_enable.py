"""The enable playbook sets page fusion on the listed domains, host batch by batch."""

from __future__ import annotations

import json

import pytest

from pagefusion.element import PageFusion

pytestmark = [pytest.mark.fleet, pytest.mark.libvirt]


def _domains(*entries: dict) -> str:
    return json.dumps({"pagefusion_enable_domains": list(entries)})


def test_enable_sets_page_fusion_on_every_listed_domain(fleet, enabled):
    for host in fleet.hosts:
        assert enabled.count(host.name, "failed") == 0
        # The session's guests start with page fusion off: each one changes.
        for name in fleet.guests[host.name]:
            assert f"changed: [{host.name}] => (item={name})" in enabled.output
            assert fleet.page_fusion(host, name) == PageFusion(enabled=True, group=fleet.group)
            assert "<nosharepages/>" not in fleet.domain(host, name).XMLDesc(0)


def test_enable_second_run_changes_nothing(fleet, enabled):
    run = fleet.playbook("enable", "-e", "pagefusion_enable_serial=2")
    run.assert_succeeded()
    for host in fleet.hosts:
        assert run.changed(host.name) == 0, run.describe(f"{host.name} changed again")


def test_enable_in_check_mode_shows_the_change_and_makes_none(fleet, enabled):
    host = fleet.host("fleet1")
    name = fleet.guests[host.name][0]

    run = fleet.playbook(
        "enable",
        "--check",
        "--diff",
        "--limit",
        host.name,
        "-e",
        _domains({"name": name, "state": "off"}),
    )

    run.assert_succeeded()
    assert run.changed(host.name) == 1
    assert '-<pagefusion:page-fusion xmlns:pagefusion="' in run.output
    assert f'state="on" group="{fleet.group}"/>' in run.output
    assert "+<pagefusion:page-fusion" in run.output and 'state="off"/>' in run.output
    assert fleet.page_fusion(host, name) == PageFusion(enabled=True, group=fleet.group)


def test_enable_refuses_a_running_domain_without_the_shutdown_option(fleet, running_guest):
    host, dom = running_guest
    before = fleet.page_fusion(host, dom.name())
    wanted = "off" if before.enabled else "on"

    run = fleet.playbook(
        "enable", "--limit", host.name, "-e", _domains({"name": dom.name(), "state": wanted})
    )

    assert run.returncode != 0
    assert run.count(host.name, "failed") == 1
    assert f"domain '{dom.name()}' is running: page fusion can only be changed while" in run.output
    assert "set shutdown=true" in run.output
    assert fleet.page_fusion(host, dom.name()) == before
    assert dom.isActive()


def test_enable_with_shutdown_changes_a_running_domain_and_starts_it_again(fleet, running_guest):
    host, dom = running_guest
    before = fleet.page_fusion(host, dom.name())
    wanted = PageFusion(enabled=not before.enabled, group=fleet.group)
    first_id = dom.ID()

    run = fleet.playbook(
        "enable",
        "--limit",
        host.name,
        "-e",
        _domains({"name": dom.name(), "state": wanted.state, "group": fleet.group}),
        "-e",
        "pagefusion_enable_shutdown=true pagefusion_enable_shutdown_timeout=2",
        "-e",
        "pagefusion_enable_force=true",
    )

    run.assert_succeeded()
    assert run.changed(host.name) == 1
    assert fleet.page_fusion(host, dom.name()) == wanted
    # Shut down (this tiny guest ignores the request, so it was destroyed
    # after the timeout), changed, and started again: a new run of it.
    again = fleet.domain(host, dom.name())
    assert again.isActive() and again.ID() != first_id
    assert "did not shut down within 2 s; destroying" in run.output
