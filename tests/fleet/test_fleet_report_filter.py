"""The fleet_report filter: every host listed, figures added up, unknown fields kept.

These run without a fleet: the input is what page_fusion_info and Ansible
register for a host that answered, one that could not be reached, one whose
module failed, and one that never ran.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("ansible", reason="ansible-core is not installed")

FILTER = Path(__file__).resolve().parents[2] / "collection/plugins/filter/fleet_report.py"
_spec = importlib.util.spec_from_file_location("fleet_report", FILTER)
fleet_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet_report)

MIB = 1 << 20


def answered(shared_mib: int, *domains: tuple[str, str, int | None]) -> dict:
    """A page_fusion_info result; each domain is (name, state, fused MiB or None)."""
    settings = [
        {
            "name": name,
            "uuid": f"uuid-{name}",
            "state": state,
            "page_fusion": {"state": "on", "group": "lab"},
            "running_with": None,
            "merging_disabled": False,
        }
        for name, state, _mib in domains
    ]
    figures = [
        {
            "name": name,
            "uuid": f"uuid-{name}",
            "page_fusion": "on",
            "group": "lab",
            "Guest/RAM/Usage/Shared": mib * MIB,
            "Guest/RAM/Usage/Fusible": 2 * mib * MIB,
            "qemu_pid": 4242,
        }
        for name, _state, mib in domains
        if mib is not None
    ]
    return {
        "changed": False,
        "version": "0.1.0",
        "domains": settings,
        "metrics": {
            "host": {"RAM/VMM/Shared": shared_mib * MIB, "ksm": {"run": 1}},
            "domains": figures,
        },
    }


HOSTVARS = {
    "hv1": {"pagefusion_report_info": answered(10, ("a", "running", 6), ("b", "shut off", None))},
    "hv2": {"pagefusion_report_info": answered(4, ("c", "running", 3))},
    "hv3": {"pagefusion_report_info": {"unreachable": True, "msg": "Connection refused"}},
    "hv4": {"pagefusion_report_info": {"failed": True, "msg": "missing libvirt-python"}},
    "hv5": {},
}


def test_every_host_is_listed_with_its_status():
    report = fleet_report.fleet_report(list(HOSTVARS), HOSTVARS)

    statuses = {entry["name"]: entry["status"] for entry in report["hosts"]}
    assert statuses == {
        "hv1": "ok",
        "hv2": "ok",
        "hv3": "unreachable",
        "hv4": "failed",
        "hv5": "not run",
    }
    assert report["unreachable"] == ["hv3"]
    assert report["failed"] == ["hv4"]
    assert report["not_run"] == ["hv5"]
    assert report["hosts"][2]["message"] == "Connection refused"


def test_figures_with_a_slash_are_added_up_and_other_fields_passed_through():
    report = fleet_report.fleet_report(list(HOSTVARS), HOSTVARS)
    totals = report["totals"]

    assert totals["hosts"] == 5 and totals["hosts_ok"] == 2
    assert totals["domains"] == 3 and totals["domains_running"] == 2
    assert totals["RAM/VMM/Shared"] == 14 * MIB
    assert totals["Guest/RAM/Usage/Shared"] == 9 * MIB
    assert totals["Guest/RAM/Usage/Fusible"] == 18 * MIB
    assert "qemu_pid" not in totals
    assert report["figures"] == {
        "host": ["RAM/VMM/Shared"],
        "domain": ["Guest/RAM/Usage/Fusible", "Guest/RAM/Usage/Shared"],
    }

    a = report["hosts"][0]["domains"][0]
    assert a["qemu_pid"] == 4242 and a["page_fusion"] == {"state": "on", "group": "lab"}
    assert "Guest/RAM/Usage/Shared" not in report["hosts"][0]["domains"][1]


def test_a_host_missing_from_the_inventory_is_an_error():
    with pytest.raises(fleet_report.AnsibleFilterError, match="'hv9' is not in the inventory"):
        fleet_report.fleet_report(["hv9"], HOSTVARS)
