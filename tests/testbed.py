"""The real test bed: libvirtd with pagefusion's hook, tiny TCG guests, KSM.

Tests that cross into libvirt, QEMU or KSM use these through the fixtures in
``conftest.py``. Everything here acts on the real host: it starts virtlogd
and libvirtd when they are not running, installs the hook and restarts
libvirtd so that it is seen, and removes every guest it made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from pagefusion import guestimage, guests, install, ksm, paths, runstate, services
from pagefusion.connection import open_connection
from pagefusion.demo import DEMO_PREFIX
from pagefusion.element import PageFusion

TEST_PREFIX = "pftest-"
RECORDER_DIR = Path("/var/lib/pagefusion-test/recorder")
RECORDER_PATH = paths.hook_dir() / "zz-pagefusion-test-recorder"

# A second hook, run after pagefusion's (hooks run in name order), that keeps
# a copy of every XML libvirtd hands to the hooks, so tests can check that
# pagefusion was given, and recorded, exactly that document.
RECORDER_SCRIPT = f"""#!/bin/sh
dir={RECORDER_DIR}
mkdir -p "$dir"
call="$dir/$(date +%s%N)-$$"
{{ printf '%s\\t%s\\t%s\\n' "$1" "$2" "$3"; cat; }} > "$call.tmp" && mv "$call.tmp" "$call.call"
"""


def libvirtd_unavailable_reason() -> str | None:
    """Why libvirtd cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "the libvirt test bed needs root"
    for tool in ("libvirtd", "virtlogd", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    return None


class SharedConnection:
    """A libvirt connection shared by many tests that survives a libvirtd restart.

    Tests restart libvirtd on purpose; the next call through this object
    opens a new connection instead of failing on the closed one.
    """

    def __init__(self) -> None:
        self._conn = open_connection()

    def restart_libvirtd(self) -> None:
        """Restart libvirtd (guests keep running) and connect again."""
        services.restart_libvirtd()
        self.reconnect()

    def reconnect(self) -> None:
        """Connect again, after something else restarted libvirtd."""
        self._conn = open_connection()

    def __getattr__(self, name: str):
        try:
            alive = self._conn.isAlive()
        except libvirt.libvirtError:
            alive = False
        if not alive:
            self._conn = open_connection()
        return getattr(self._conn, name)


def ensure_libvirtd_with_hook() -> SharedConnection:
    """libvirtd running, with pagefusion's hook and the recorder seen by it."""
    services.start_libvirt()
    changed = install.install_hook()
    paths.hook_dir().mkdir(parents=True, exist_ok=True)
    if not RECORDER_PATH.exists() or RECORDER_PATH.read_text() != RECORDER_SCRIPT:
        RECORDER_PATH.write_text(RECORDER_SCRIPT)
        RECORDER_PATH.chmod(0o755)
        changed = True
    pid = services.libvirtd_pid()
    hooks_newer = max(paths.hook_path().stat().st_mtime, RECORDER_PATH.stat().st_mtime)
    if changed or pid is None or not services.started_after(pid, hooks_newer):
        services.restart_libvirtd()
    return SharedConnection()


@dataclass
class RecordedCall:
    args: tuple[str, str, str]
    xml: str


def recorded_calls() -> list[RecordedCall]:
    """Every call the recorder saw, oldest first."""
    calls = []
    for call_file in sorted(RECORDER_DIR.glob("*.call")):
        head, _, xml = call_file.read_text().partition("\n")
        calls.append(RecordedCall(args=tuple(head.split("\t")), xml=xml))
    return calls


def clear_recorder() -> None:
    shutil.rmtree(RECORDER_DIR, ignore_errors=True)


@dataclass
class GuestFactory:
    """Makes test guests and removes every one of them afterwards."""

    conn: libvirt.virConnect
    image: guestimage.GuestImage
    made: list[str] = field(default_factory=list)

    def spec(self, page_fusion: PageFusion, **kwargs) -> guests.GuestSpec:
        name = f"{TEST_PREFIX}{uuid.uuid4().hex[:8]}"
        return guests.GuestSpec(name, page_fusion, **kwargs)

    def define(self, spec: guests.GuestSpec) -> libvirt.virDomain:
        self.made.append(spec.name)
        return guests.define(self.conn, spec, self.image)

    def boot(self, spec: guests.GuestSpec) -> libvirt.virDomain:
        dom = self.define(spec)
        dom.create()
        guests.wait_until_booted(spec)
        return dom

    def cleanup(self) -> None:
        for name in self.made:
            guests.remove(self.conn, name)
        self.made.clear()


def remove_leftover_guests(conn: libvirt.virConnect) -> None:
    """Remove test guests a killed earlier run left behind, and demo guests:
    the tests' page-fusion guests could not start beside another group."""
    for dom in conn.listAllDomains():
        if dom.name().startswith((TEST_PREFIX, DEMO_PREFIX)):
            guests.remove(conn, dom.name())


@contextlib.contextmanager
def ksm_settings_restored():
    """Put KSM's tunables back as they were found: other users may share them."""
    saved = {name: ksm.read_value(name) for name in ksm.TUNABLES if (ksm.SYSFS / name).exists()}
    try:
        yield saved
    finally:
        for name in sorted(saved, key=lambda n: n == "run"):
            with contextlib.suppress(Exception):
                ksm.write_value(name, saved[name])


def virsh(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args],
        capture_output=True,
        text=True,
        check=check,
        env=env,
        timeout=120,
    )


def eventually(check, timeout_s: float, interval_s: float = 0.05):
    """Poll ``check`` until it returns a true value or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval_s)


def qemu_facts(name: str) -> tuple[bool, bool | None]:
    """Whether the running guest's QEMU command line turns merging off, and the
    ``ksm_mergeable`` of its process."""
    pid = runstate.qemu_pid_of(name)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    merge_off = "mem-merge=off" in cmdline or '"merge":false' in cmdline
    stat = ksm.process_stat(pid)
    return merge_off, stat.mergeable if stat else None


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pagefusion.cli", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def virsh_set_metadata(name: str, element_xml: str, where: str = "--config"):
    """``virsh metadata NAME NS WHERE --key pagefusion --set ELEMENT``: the
    user's way of changing the element by hand."""
    from pagefusion.element import NAMESPACE, PREFIX

    return virsh("metadata", name, NAMESPACE, where, "--key", PREFIX, "--set", element_xml)
