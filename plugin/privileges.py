"""Dropping a fusion worker's privileges to what reading guest memory needs.

A worker runs as root (its files under /run/pagefusion are root's) but keeps
only three capabilities: CAP_SYS_PTRACE, to be allowed at another user's
``/proc/PID/mem`` and ``pagemap`` (QEMU runs as libvirt-qemu);
CAP_DAC_READ_SEARCH, to open those files, which belong to that user with
mode 0600 (reading only: no CAP_DAC_OVERRIDE); and CAP_SYS_ADMIN, without
which ``pagemap`` hides the page frame numbers that tell the zero page
apart. Everything else leaves the effective,
permitted, inheritable and bounding sets, and ``no_new_privs`` is set, so
nothing it runs can get them back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from pagefusion.errors import HostError

log = logging.getLogger(__name__)

CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
WORKER_CAPABILITIES = (CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN)

_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as last:
            return int(last.read())
    except (OSError, ValueError):
        return 40


def capability_mask(capabilities: tuple[int, ...]) -> int:
    mask = 0
    for capability in capabilities:
        mask |= 1 << capability
    return mask


def keep_only(capabilities: tuple[int, ...] = WORKER_CAPABILITIES) -> None:
    """Drop every capability but ``capabilities``; raise HostError if the kernel refuses."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    for capability in range(_last_capability() + 1):
        if capability not in capabilities and libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0):
            errno = ctypes.get_errno()
            if errno != 22:  # EINVAL: a capability this kernel does not know
                raise HostError(f"cannot drop capability {capability}: {os.strerror(errno)}")

    mask = capability_mask(capabilities)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    if libc.capset(ctypes.byref(header), data):
        raise HostError(f"cannot set capabilities: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise HostError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")
    log.debug("capabilities now %#x", mask)


def effective_mask(pid: int | str = "self") -> int:
    """The effective capability set of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0
