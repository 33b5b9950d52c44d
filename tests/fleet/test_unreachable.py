"""A host that is down is listed in the fleet report as unreachable, not dropped."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.fleet, pytest.mark.libvirt]


def test_report_lists_a_host_whose_sshd_is_stopped_as_unreachable(fleet, deployed):
    down = fleet.hosts[-1]
    folder = fleet.base / "report-down"
    down.stop_sshd()
    try:
        run = fleet.playbook("report", "-e", f"pagefusion_report_dir={folder}")
    finally:
        down.start_sshd()

    run.assert_succeeded()
    data = json.loads((folder / "fleet-report.json").read_text())
    entries = {entry["name"]: entry for entry in data["hosts"]}
    assert list(entries) == [host.name for host in fleet.hosts]
    assert data["unreachable"] == [down.name]
    assert entries[down.name]["status"] == "unreachable"
    assert "Connection refused" in entries[down.name]["message"]
    for host in fleet.hosts[:-1]:
        assert entries[host.name]["status"] == "ok"
    assert data["totals"]["hosts"] == len(fleet.hosts)
    assert data["totals"]["hosts_ok"] == len(fleet.hosts) - 1
    markdown = (folder / "fleet-report.md").read_text()
    assert f"| {down.name} | **unreachable** |" in markdown
    assert f"- **{down.name}**: unreachable:" in markdown
