"""Where pagefusion keeps its files on a host.

Everything is root-only (directories 0700, files 0600): the state records who
shares memory with whom, and the fingerprint key must never leak to a guest's
owner. The environment variables exist for tests and for hosts that keep
/var/lib or /run elsewhere; libvirtd does not pass them to hooks, so the hook
always uses the defaults.
"""

import os
from pathlib import Path

STATE_DIR = Path(os.environ.get("PAGEFUSION_STATE_DIR", "/var/lib/pagefusion"))
RUN_DIR = Path(os.environ.get("PAGEFUSION_RUN_DIR", "/run/pagefusion"))
LIBVIRT_CONFIG_DIR = Path(os.environ.get("PAGEFUSION_LIBVIRT_CONFIG_DIR", "/etc/libvirt"))
LIBVIRT_RUN_DIR = Path(os.environ.get("PAGEFUSION_LIBVIRT_RUN_DIR", "/run/libvirt"))


def hook_dir() -> Path:
    return LIBVIRT_CONFIG_DIR / "hooks" / "qemu.d"


def hook_path() -> Path:
    return hook_dir() / "pagefusion"


def hook_journal() -> Path:
    return STATE_DIR / "hook-calls.jsonl"


def ksm_saved() -> Path:
    """The host's KSM tunables as they were before pagefusion changed them."""
    return STATE_DIR / "ksm-before-install.json"


def host_lock() -> Path:
    return RUN_DIR / "host.lock"


def domain_records() -> Path:
    return RUN_DIR / "domains"


def worker_dir() -> Path:
    return RUN_DIR / "workers"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` as a root-only directory and return it.

    Missing parents are created root-only too (``mkdir(parents=True)`` would
    give them the umask's mode); existing ones are left as they are.
    """
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def persistent_definition(domain_name: str) -> Path:
    """libvirt's own file for a persistent QEMU domain's inactive definition."""
    return LIBVIRT_CONFIG_DIR / "qemu" / f"{domain_name}.xml"


def qemu_pidfile(domain_name: str) -> Path:
    return LIBVIRT_RUN_DIR / "qemu" / f"{domain_name}.pid"
