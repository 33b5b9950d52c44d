# Copyright: pagefusion contributors
# GNU General Public License v2.0 or later (see https://www.gnu.org/licenses/gpl-2.0.txt)
"""The fleet report: what page_fusion_info returned on each host, in one document.

Figures keep pagefusion's own names. Those named like VirtualBox's metrics
(with a ``/``: ``RAM/VMM/Shared`` per host, ``Guest/RAM/Usage/Shared`` per
domain) are byte counts and are added up; every other field is passed
through as the host gave it, so figures pagefusion adds later appear in the
report without a change here.
"""

from __future__ import annotations

from collections.abc import Mapping

from ansible.errors import AnsibleFilterError

STATUS_OK = "ok"
STATUS_UNREACHABLE = "unreachable"
STATUS_FAILED = "failed"
STATUS_NOT_RUN = "not run"

NOT_RUN_MESSAGE = "no result: the host was left out of the run, or dropped by an earlier failure"


def _is_figure(name, value) -> bool:
    return "/" in name and isinstance(value, (int, float)) and not isinstance(value, bool)


def _add_figures(sums: dict, record: Mapping) -> None:
    for name, value in record.items():
        if _is_figure(name, value):
            sums[name] = sums.get(name, 0) + value


def _domains(result: Mapping) -> list[dict]:
    """Each domain's setting with its figures (running domains the hook knows have them)."""
    figures = {d.get("uuid"): d for d in result.get("metrics", {}).get("domains", [])}
    domains = []
    for setting in result.get("domains", []):
        entry = dict(setting)
        measured = figures.pop(setting.get("uuid"), {})
        entry.update({k: v for k, v in measured.items() if k not in entry})
        domains.append(entry)
    # Figures of domains gone from libvirt's list between the two reads.
    domains.extend(dict(d) for d in figures.values())
    return sorted(domains, key=lambda d: d.get("name") or "")


def _page_fusion_state(domain: Mapping) -> str | None:
    value = domain.get("page_fusion")
    return value.get("state") if isinstance(value, Mapping) else value


def _domain_totals(domains: list[dict]) -> dict:
    totals = {
        "domains": len(domains),
        "domains_running": sum(1 for d in domains if d.get("state") == "running"),
        "domains_page_fusion_on": sum(1 for d in domains if _page_fusion_state(d) == "on"),
    }
    for domain in domains:
        _add_figures(totals, domain)
    return totals


def host_entry(name: str, result: Mapping | None) -> dict:
    """One host's part of the report, from its registered page_fusion_info result."""
    if result is None:
        return {"name": name, "status": STATUS_NOT_RUN, "message": NOT_RUN_MESSAGE}
    if result.get("unreachable"):
        return {"name": name, "status": STATUS_UNREACHABLE, "message": result.get("msg", "")}
    if result.get("failed") or "metrics" not in result:
        message = result.get("msg") or "page_fusion_info returned no figures"
        return {"name": name, "status": STATUS_FAILED, "message": message}

    domains = _domains(result)
    host = dict(result["metrics"].get("host", {}))
    totals = _domain_totals(domains)
    _add_figures(totals, host)
    return {
        "name": name,
        "status": STATUS_OK,
        "version": result.get("version"),
        "host": host,
        "domains": domains,
        "totals": totals,
    }


def fleet_report(hosts, hostvars, result_name="pagefusion_report_info"):
    """The fleet report for the inventory names ``hosts``, from their ``hostvars``."""
    if isinstance(hosts, str) or not isinstance(hosts, (list, tuple)):
        raise AnsibleFilterError(f"fleet_report: expected a list of host names, got {hosts!r}")

    entries = []
    for name in hosts:
        try:
            result = hostvars[name].get(result_name)
        except KeyError:
            raise AnsibleFilterError(f"fleet_report: {name!r} is not in the inventory") from None
        entries.append(host_entry(name, result))

    by_status = {}
    for entry in entries:
        by_status.setdefault(entry["status"], []).append(entry["name"])

    totals = {"hosts": len(entries), "hosts_ok": len(by_status.get(STATUS_OK, []))}
    names = {"host": set(), "domain": set()}
    for entry in entries:
        if entry["status"] != STATUS_OK:
            continue
        for key, value in entry["totals"].items():
            totals[key] = totals.get(key, 0) + value
        names["host"].update(k for k, v in entry["host"].items() if _is_figure(k, v))
        for domain in entry["domains"]:
            names["domain"].update(k for k, v in domain.items() if _is_figure(k, v))

    return {
        "totals": totals,
        "figures": {kind: sorted(found) for kind, found in names.items()},
        "unreachable": by_status.get(STATUS_UNREACHABLE, []),
        "failed": by_status.get(STATUS_FAILED, []),
        "not_run": by_status.get(STATUS_NOT_RUN, []),
        "hosts": entries,
    }


class FilterModule:
    def filters(self):
        return {"fleet_report": fleet_report}
