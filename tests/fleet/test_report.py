"""The report playbook gathers every host's figures into one fleet report."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import testbed

from pagefusion import ksm

pytestmark = [pytest.mark.fleet, pytest.mark.libvirt]

HOST_SHARED = "RAM/VMM/Shared"
GUEST_SHARED = "Guest/RAM/Usage/Shared"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# KSM goes on merging while the report runs: the report's figure must lie
# between the kernel's readings before and after it, give or take this much.
DRIFT = 0.10


@dataclass
class Report:
    run: object
    data: dict
    markdown: str


def make_report(fleet, folder: Path, *args: str) -> Report:
    run = fleet.playbook("report", "-e", f"pagefusion_report_dir={folder}", *args)
    run.assert_succeeded()
    return Report(
        run=run,
        data=json.loads((folder / "fleet-report.json").read_text()),
        markdown=(folder / "fleet-report.md").read_text(),
    )


@pytest.fixture(scope="module")
def report(fleet, enabled) -> Report:
    return make_report(fleet, fleet.base / "report")


def test_report_has_every_host_and_each_of_its_domains(fleet, report):
    entries = {entry["name"]: entry for entry in report.data["hosts"]}
    assert list(entries) == [host.name for host in fleet.hosts]
    for host in fleet.hosts:
        entry = entries[host.name]
        assert entry["status"] == "ok", entry
        assert entry["version"] == "0.1.0"
        assert HOST_SHARED in entry["host"] and "ksm" in entry["host"]
        assert [d["name"] for d in entry["domains"]] == fleet.guests[host.name]
        assert f"| {host.name} | ok |" in report.markdown
        for domain in entry["domains"]:
            value = fleet.page_fusion(host, domain["name"])
            assert domain["page_fusion"] == {"state": value.state, "group": value.group}
            row = f"| {host.name} | {domain['name']} | shut off | {value.state} | {value.group} |"
            assert row in report.markdown
    assert report.data["unreachable"] == [] and report.data["failed"] == []


def test_report_totals_are_the_sums_of_the_hosts_figures(fleet, report):
    entries = report.data["hosts"]
    domains = [domain for entry in entries for domain in entry["domains"]]
    totals = report.data["totals"]

    assert totals["hosts"] == totals["hosts_ok"] == len(fleet.hosts)
    assert totals["domains"] == len(domains) == sum(len(names) for names in fleet.guests.values())
    assert totals["domains_page_fusion_on"] == sum(
        fleet.page_fusion(host, name).enabled
        for host in fleet.hosts
        for name in fleet.guests[host.name]
    )
    assert totals[HOST_SHARED] == sum(entry["host"][HOST_SHARED] for entry in entries)
    assert totals.get(GUEST_SHARED, 0) == sum(d.get(GUEST_SHARED, 0) for d in domains)
    assert HOST_SHARED in report.data["figures"]["host"]
    for name in report.data["figures"]["host"]:
        assert totals[name] == sum(entry["host"].get(name, 0) for entry in entries), name


def test_report_second_run_changes_nothing_on_the_hosts(fleet, report):
    again = make_report(fleet, fleet.base / "report")
    for host in fleet.hosts:
        assert again.run.changed(host.name) == 0, again.run.describe(host.name)
    # Only the figures, which KSM moves all the time, may differ.
    assert [e["name"] for e in again.data["hosts"]] == [e["name"] for e in report.data["hosts"]]


def test_report_in_check_mode_writes_nothing(fleet, report):
    folder = fleet.base / "report-check"
    run = fleet.playbook("report", "--check", "-e", f"pagefusion_report_dir={folder}")
    run.assert_succeeded()
    for host in fleet.hosts:
        assert run.changed(host.name) == 0
    assert not folder.exists()


def guest_shared_bytes(host, name: str) -> int:
    """The kernel's fused memory of a fleet guest, from its QEMU's ksm_stat."""
    pid = int((host.private("/run") / "libvirt" / "qemu" / f"{name}.pid").read_text())
    stat = dict(line.split()[:2] for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines())
    return (int(stat["ksm_merging_pages"]) + int(stat.get("ksm_zero_pages", 0))) * PAGE_SIZE


def assert_between(reported: int, before: int, after: int, what: str) -> None:
    low, high = min(before, after) * (1 - DRIFT), max(before, after) * (1 + DRIFT)
    assert low <= reported <= high, f"{what}: reported {reported}, kernel {before} then {after}"


@pytest.fixture
def fused_guest(fleet, enabled):
    """fleet1's first guest, which keeps page fusion on, running; destroyed after."""
    with fleet.guest_running("fleet1") as (host, dom):
        assert fleet.page_fusion(host, dom.name()).enabled
        yield host, dom


def test_report_shows_the_kernels_fused_memory_of_a_running_guest(fleet, fused_guest, tmp_path):
    host, dom = fused_guest
    name = dom.name()
    assert testbed.eventually(lambda: guest_shared_bytes(host, name) > 0, 90.0, 0.5)
    guest_before, host_before = guest_shared_bytes(host, name), ksm.shared_bytes()

    report = make_report(fleet, tmp_path, "-e", f"pagefusion_hosts={host.name}")

    guest_after, host_after = guest_shared_bytes(host, name), ksm.shared_bytes()
    (entry,) = [entry for entry in report.data["hosts"] if entry["name"] == host.name]
    (domain,) = [domain for domain in entry["domains"] if domain["name"] == name]
    assert_between(domain[GUEST_SHARED], guest_before, guest_after, GUEST_SHARED)
    assert_between(entry["host"][HOST_SHARED], host_before, host_after, HOST_SHARED)
    assert report.data["totals"][GUEST_SHARED] == domain[GUEST_SHARED]
