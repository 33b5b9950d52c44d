"""Fused-memory metrics in VirtualBox's names, read from the kernel's counters.

``RAM/VMM/Shared``
    Memory saved on the host by fusion, in bytes: KSM's ``pages_sharing``
    plus ``ksm_zero_pages``, times the page size.
``Guest/RAM/Usage/Shared``
    Fused memory of one domain, in bytes: ``ksm_merging_pages`` plus
    ``ksm_zero_pages`` from ``/proc/PID/ksm_stat`` of its QEMU process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pagefusion import ksm, runstate

log = logging.getLogger(__name__)

HOST_SHARED = "RAM/VMM/Shared"
GUEST_SHARED = "Guest/RAM/Usage/Shared"


@dataclass(frozen=True)
class DomainMetrics:
    name: str
    uuid: str
    page_fusion: str
    group: str | None
    qemu_pid: int | None
    shared_bytes: int
    mergeable: bool | None


@dataclass(frozen=True)
class HostMetrics:
    shared_bytes: int
    ksm: dict[str, int]
    domains: list[DomainMetrics]

    def as_dict(self) -> dict[str, object]:
        """The JSON form: VirtualBox's metric names as keys, bytes as values."""
        return {
            "host": {HOST_SHARED: self.shared_bytes, "ksm": self.ksm},
            "domains": [
                {
                    "name": d.name,
                    "uuid": d.uuid,
                    "page_fusion": d.page_fusion,
                    "group": d.group,
                    GUEST_SHARED: d.shared_bytes,
                }
                for d in self.domains
            ],
        }


def _qemu_pid(record: runstate.DomainRecord) -> int | None:
    if record.qemu_alive():
        return record.qemu_pid
    return runstate.qemu_pid_of(record.name)


def domain_metrics(record: runstate.DomainRecord) -> DomainMetrics:
    pid = _qemu_pid(record)
    stat = ksm.process_stat(pid) if pid else None
    return DomainMetrics(
        name=record.name,
        uuid=record.uuid,
        page_fusion=record.page_fusion.state,
        group=record.group,
        qemu_pid=pid,
        shared_bytes=stat.shared_bytes if stat else 0,
        mergeable=stat.mergeable if stat else None,
    )


def collect(names: list[str] | None = None) -> HostMetrics:
    """Host and per-domain figures for the running domains the hook knows."""
    counters = ksm.counters()
    records = [r for r in runstate.all_records() if r.phase == runstate.PHASE_RUNNING]
    if names:
        records = [r for r in records if r.name in names]
    return HostMetrics(
        shared_bytes=ksm.shared_bytes(counters),
        ksm=counters,
        domains=[domain_metrics(r) for r in records],
    )
