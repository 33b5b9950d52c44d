"""Fused-memory metrics in VirtualBox's names, read from the kernel's counters.

The two metrics VirtualBox's Page Fusion shows:

``RAM/VMM/Shared``
    Memory saved on the host by fusion: KSM's ``pages_sharing`` plus
    ``ksm_zero_pages``, times the page size.
``Guest/RAM/Usage/Shared``
    Fused memory of one domain: ``ksm_merging_pages`` plus ``ksm_zero_pages``
    from ``/proc/PID/ksm_stat`` of its QEMU process, times the page size.

and pagefusion's own, from its workers' reports, KSM's sysfs and the daemon.
Every running domain the hook knows appears, page fusion on or off: a domain
with page fusion off shows what the kernel says of it (zero), not a gap.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pagefusion import ksm, ledger, pacing, runstate
from pagefusion.errors import PagefusionError
from pagefusion.worker import Report, read_report

log = logging.getLogger(__name__)

HOST_SHARED = "RAM/VMM/Shared"
GUEST_SHARED = "Guest/RAM/Usage/Shared"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Metric:
    name: str
    scope: str  # "host" or "domain"
    unit: str
    prometheus: str
    kind: str  # "gauge" or "counter"
    source: str
    meaning: str


CATALOGUE = (
    Metric(HOST_SHARED, "host", "bytes", "pagefusion_host_shared_bytes", "gauge",
           "/sys/kernel/mm/ksm: (pages_sharing + ksm_zero_pages) * page size",
           "memory saved on the host by fusion"),
    Metric("RAM/VMM/Fusible", "host", "bytes", "pagefusion_host_fusible_bytes", "gauge",
           "sum of the workers' fusible estimates",
           "memory the workers found fusible in running page-fusion domains"),
    Metric("RAM/VMM/Backlog", "host", "bytes", "pagefusion_host_backlog_bytes", "gauge",
           "daemon's pacing decision: fusible minus fused",
           "fusible memory KSM has not fused yet"),
    Metric("RAM/VMM/KSM/Profit", "host", "bytes", "pagefusion_ksm_general_profit_bytes", "gauge",
           "/sys/kernel/mm/ksm/general_profit",
           "KSM's own profit: memory saved minus its metadata"),
    Metric("CPU/KSM/Time", "host", "seconds", "pagefusion_ksmd_cpu_seconds_total", "counter",
           "/proc/PID/stat of the ksmd thread: utime + stime",
           "CPU time ksmd has used since boot"),
    Metric("Pacing/Fast", "host", "boolean", "pagefusion_pacing_fast", "gauge",
           "daemon's pacing decision (/run/pagefusion/pacing.json)",
           "1 while KSM scans fast for a backlog, else 0"),
    Metric("Changes/Refused", "host", "count", "pagefusion_refused_changes_total", "counter",
           "/var/lib/pagefusion/counters.json",
           "changes of the element to running domains that the daemon undid"),
    Metric("Starts/Refused", "host", "count", "pagefusion_refused_starts_total", "counter",
           "/var/lib/pagefusion/counters.json",
           "starts, restores and migrations the hook refused"),
    Metric(GUEST_SHARED, "domain", "bytes", "pagefusion_domain_shared_bytes", "gauge",
           "/proc/PID/ksm_stat: (ksm_merging_pages + ksm_zero_pages) * page size",
           "fused memory of the domain"),
    Metric("Guest/RAM/Usage/Fusible", "domain", "bytes", "pagefusion_domain_fusible_bytes",
           "gauge", "the domain's worker: stable duplicate and zero pages of its last cycle",
           "memory of the domain that KSM could fuse now"),
    Metric("Guest/RAM/Usage/Volatile", "domain", "bytes", "pagefusion_domain_volatile_bytes",
           "gauge", "the domain's worker: pages that changed between two looks",
           "memory of the domain that changes too often to fuse"),
    Metric("Guest/RAM/Usage/Zero", "domain", "bytes", "pagefusion_domain_zero_bytes", "gauge",
           "the domain's worker: all-zero pages of its last cycle",
           "zero-filled memory of the domain"),
    Metric("Guest/PageFusion/Enabled", "domain", "boolean",
           "pagefusion_domain_page_fusion_enabled", "gauge",
           "the value the domain was started with (hook's record)",
           "1 if the domain runs with page fusion on, else 0"),
)  # fmt: skip

BY_NAME = {metric.name: metric for metric in CATALOGUE}


@dataclass(frozen=True)
class DomainMetrics:
    name: str
    uuid: str
    page_fusion: str
    group: str | None
    qemu_pid: int | None
    values: dict[str, float]

    @property
    def shared_bytes(self) -> int:
        return int(self.values[GUEST_SHARED])


@dataclass(frozen=True)
class HostMetrics:
    values: dict[str, float]
    ksm: dict[str, int]
    pacing_mode: str | None
    domains: list[DomainMetrics]

    @property
    def shared_bytes(self) -> int:
        return int(self.values[HOST_SHARED])

    def as_dict(self) -> dict[str, object]:
        """The JSON form: metric names as keys, values in the catalogue's units."""
        return {
            "host": {**self.values, "pacing_mode": self.pacing_mode, "ksm": self.ksm},
            "domains": [
                {
                    "name": d.name,
                    "uuid": d.uuid,
                    "page_fusion": d.page_fusion,
                    "group": d.group,
                    "qemu_pid": d.qemu_pid,
                    **d.values,
                }
                for d in self.domains
            ],
        }


@functools.cache
def _ksmd_pid() -> int | None:
    """The pid of the ksmd kernel thread, found once by its name."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text() == "ksmd\n":
                    return int(entry.name)
            except OSError:
                continue
    return None


def _ksmd_cpu_seconds() -> float:
    pid = _ksmd_pid()
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def domain_metrics(record: runstate.DomainRecord, report: Report | None) -> DomainMetrics:
    pid = record.qemu_pid if record.qemu_alive() else runstate.qemu_pid_of(record.name)
    stat = ksm.process_stat(pid) if pid else None
    cycle = report.cycle if report is not None and report.measured else {}
    page = ksm.PAGE_SIZE
    return DomainMetrics(
        name=record.name,
        uuid=record.uuid,
        page_fusion=record.page_fusion.state,
        group=record.group,
        qemu_pid=pid,
        values={
            GUEST_SHARED: stat.shared_bytes if stat else 0,
            "Guest/RAM/Usage/Fusible": cycle.get("pages_fusible", 0) * page,
            "Guest/RAM/Usage/Volatile": cycle.get("pages_volatile", 0) * page,
            "Guest/RAM/Usage/Zero": cycle.get("pages_zero", 0) * page,
            "Guest/PageFusion/Enabled": 1 if record.enabled else 0,
        },
    )


def running_records() -> list[runstate.DomainRecord]:
    return [
        r
        for r in runstate.all_records()
        if r.phase == runstate.PHASE_RUNNING and (r.qemu_alive() or r.qemu_pid is None)
    ]


def collect(names: list[str] | None = None) -> HostMetrics:
    """Every metric of the host and of its running domains (or of ``names``)."""
    records = running_records()
    if names:
        known = {r.name for r in records}
        missing = [n for n in names if n not in known]
        if missing:
            raise PagefusionError(
                f"domain {missing[0]!r} is not running, or was started before pagefusion"
                " was installed and the daemon has not seen it yet"
            )
        records = [r for r in records if r.name in names]

    counters = ksm.counters()
    decision = pacing.read_decision() or {}
    refused = ledger.counters()
    domains = [domain_metrics(r, read_report(r.uuid) if r.enabled else None) for r in records]
    page = ksm.PAGE_SIZE
    fusible = sum(d.values["Guest/RAM/Usage/Fusible"] for d in domains if d.page_fusion == "on")
    values = {
        HOST_SHARED: ksm.shared_bytes(counters),
        "RAM/VMM/Fusible": fusible,
        "RAM/VMM/Backlog": decision.get("backlog_pages", 0) * page,
        "RAM/VMM/KSM/Profit": counters.get("general_profit", 0),
        "CPU/KSM/Time": _ksmd_cpu_seconds(),
        "Pacing/Fast": 1 if decision.get("mode") == "fast" else 0,
        "Changes/Refused": refused.get(ledger.REJECTED_CHANGES, 0),
        "Starts/Refused": refused.get(ledger.REFUSED_STARTS, 0),
    }
    return HostMetrics(
        values=values, ksm=counters, pacing_mode=decision.get("mode"), domains=domains
    )
