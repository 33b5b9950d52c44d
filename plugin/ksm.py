"""The kernel's KSM: its sysfs knobs and counters, and per-process ``ksm_stat``.

KSM settings are host-wide and other software may use them too, so pagefusion
only writes what it means to change and remembers what the host had before.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pagefusion import paths
from pagefusion.errors import HostError

log = logging.getLogger(__name__)

SYSFS = Path(os.environ.get("PAGEFUSION_KSM_SYSFS", "/sys/kernel/mm/ksm"))
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

RUN_STOP = 0  # stop ksmd, keep merged pages
RUN_MERGE = 1  # ksmd scans and merges
RUN_UNMERGE = 2  # stop ksmd and unmerge every page

# The tunables pagefusion may change, saved before install and put back after.
TUNABLES = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "smart_scan")


def available() -> bool:
    return (SYSFS / "run").exists()


def writable() -> bool:
    """True if KSM is there and this process may change it (root, not read-only)."""
    return available() and os.access(SYSFS / "run", os.W_OK)


def read_value(name: str) -> int | str:
    """One KSM sysfs file, as an int when it is a number."""
    try:
        text = (SYSFS / name).read_text().strip()
    except FileNotFoundError:
        raise HostError(f"KSM file {SYSFS / name} is missing: is CONFIG_KSM enabled?") from None
    try:
        return int(text)
    except ValueError:
        return text


def write_value(name: str, value: int | str) -> None:
    """Write one KSM tunable; say which and why when the kernel refuses."""
    path = SYSFS / name
    try:
        current = path.read_text().strip()
        if current == str(value):
            return
        path.write_text(f"{value}\n")
    except FileNotFoundError:
        raise HostError(f"KSM file {path} is missing: is CONFIG_KSM enabled?") from None
    except OSError as err:
        raise HostError(f"cannot set KSM {name} to {value!r} in {path}: {err.strerror}") from None
    log.info("KSM %s set to %s (was %s)", name, value, current)


def counters() -> dict[str, int]:
    """Every numeric KSM counter and tunable the kernel exposes."""
    values: dict[str, int] = {}
    try:
        entries = sorted(SYSFS.iterdir())
    except FileNotFoundError:
        return values
    for entry in entries:
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        if text.lstrip("-").isdigit():
            values[entry.name] = int(text)
    return values


FUSED_COUNTERS = ("pages_sharing", "ksm_zero_pages")


def fused_pages(values: dict[str, int] | None = None) -> int:
    """Pages KSM saves on the host: sharing pages plus merged zero pages.

    Without ``values``, reads only those two counters (a cheap look).
    """
    if values is None:
        values = {}
        for name in FUSED_COUNTERS:
            try:
                values[name] = int((SYSFS / name).read_text())
            except (OSError, ValueError):
                continue
    return sum(values.get(name, 0) for name in FUSED_COUNTERS)


def shared_bytes(values: dict[str, int] | None = None) -> int:
    """Memory KSM saves on the host, in bytes."""
    return fused_pages(values) * PAGE_SIZE


@dataclass(frozen=True)
class ProcessStat:
    """``/proc/PID/ksm_stat`` of one process."""

    pid: int
    merging_pages: int
    zero_pages: int
    process_profit: int
    mergeable: bool | None

    @property
    def shared_bytes(self) -> int:
        return (self.merging_pages + self.zero_pages) * PAGE_SIZE


def process_stat(pid: int) -> ProcessStat | None:
    """KSM figures of one process, or None if it has gone."""
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        fields[key.rstrip(":")] = value.strip()
    mergeable = fields.get("ksm_mergeable")
    return ProcessStat(
        pid=pid,
        merging_pages=int(fields.get("ksm_merging_pages", 0)),
        zero_pages=int(fields.get("ksm_zero_pages", 0)),
        process_profit=int(fields.get("ksm_process_profit", 0)),
        mergeable=None if mergeable is None else mergeable == "yes",
    )


def save_host_settings() -> None:
    """Remember the host's KSM tunables once, before pagefusion first changes them."""
    if paths.ksm_saved().exists() or not available():
        return
    saved = {name: read_value(name) for name in TUNABLES if (SYSFS / name).exists()}
    paths.ensure_private_dir(paths.ksm_saved().parent)
    paths.ksm_saved().write_text(json.dumps(saved, sort_keys=True))
    os.chmod(paths.ksm_saved(), 0o600)
    log.info("saved the host's KSM settings %s", saved)


def restore_host_settings() -> dict[str, int | str]:
    """Put back the tunables saved by save_host_settings; return them."""
    try:
        saved = json.loads(paths.ksm_saved().read_text())
    except FileNotFoundError:
        return {}
    # run last: the other tunables apply to the scanner it starts.
    for name in sorted(saved, key=lambda n: n == "run"):
        write_value(name, saved[name])
    paths.ksm_saved().unlink()
    return saved


def ensure_running() -> None:
    """Start ksmd merging if it is not; page-fusion domains need it."""
    save_host_settings()
    if read_value("run") != RUN_MERGE:
        write_value("run", RUN_MERGE)
