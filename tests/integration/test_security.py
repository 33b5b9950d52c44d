"""Let no one in: workers only read, state is root-only, fingerprints are keyed."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import testbed

from pagefusion import paths, privileges, runstate, supervision
from pagefusion.element import PageFusion

pytestmark = pytest.mark.libvirt

ON = PageFusion(enabled=True, group="pftest")
NATIVE = Path(__file__).resolve().parents[2] / "native"

SCAN_ONCE = """
import sys
from pagefusion import scanner, worker
pid = int(sys.argv[1])
with scanner.PageScanner(pid, worker.load_or_create_key(), pages_per_pass=1 << 20) as pages:
    pages.scan_pass()
    pages.scan_pass()
print("scanned", pid)
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_reading_guest_memory_asks_for_read_access_only(guest_factory, tmp_path):
    dom = guest_factory.boot(guest_factory.spec(ON))
    pid = runstate.qemu_pid_of(dom.name())
    trace = tmp_path / "trace"

    done = subprocess.run(
        ["strace", "-f", "-qq", "-o", str(trace),
         "-e", "trace=openat,open,process_vm_readv,process_vm_writev,ptrace",
         sys.executable, "-c", SCAN_ONCE, str(pid)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    calls = trace.read_text()
    opens_of_guest = [line for line in calls.splitlines() if f'"/proc/{pid}/mem"' in line]
    assert opens_of_guest, "the guest's memory was not read"
    assert all("O_RDONLY" in line and "O_RDWR" not in line for line in opens_of_guest)
    assert "process_vm_writev" not in calls
    assert "ptrace(" not in calls


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_a_running_worker_opens_guest_memory_read_only(guest_factory, tmp_path):
    # Traced from its first passes, while the guest boots and it looks every second.
    dom = guest_factory.define(guest_factory.spec(ON))
    dom.create()
    worker = testbed.eventually(lambda: supervision.worker_pid(dom.UUIDString()), 10.0)
    assert worker
    pid = runstate.qemu_pid_of(dom.name())
    trace = tmp_path / "trace"

    subprocess.run(
        ["timeout", "-s", "INT", "5", "strace", "-p", str(worker), "-f", "-qq",
         "-o", str(trace), "-e", "trace=openat,open,process_vm_readv,process_vm_writev,ptrace"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    calls = trace.read_text()
    opens_of_guest = [
        line for line in calls.splitlines() if re.search(rf'"/proc/{pid}/(mem|pagemap)"', line)
    ]
    assert any(f'"/proc/{pid}/mem"' in line for line in opens_of_guest), calls[-2000:]
    assert all("O_RDONLY" in line and "O_RDWR" not in line for line in opens_of_guest)
    assert "process_vm_writev" not in calls and "process_vm_readv" not in calls
    assert "ptrace(" not in calls


def test_a_worker_keeps_only_the_capabilities_reading_needs(guest_factory):
    dom = guest_factory.boot(guest_factory.spec(ON))
    pid = testbed.eventually(lambda: supervision.worker_pid(dom.UUIDString()), 10.0)
    assert pid
    wanted = privileges.capability_mask(privileges.WORKER_CAPABILITIES)
    assert testbed.eventually(lambda: privileges.effective_mask(pid) == wanted, 5.0)
    status = Path(f"/proc/{pid}/status").read_text()
    assert "NoNewPrivs:\t1" in status
    assert int(re.search(r"CapBnd:\s+(\w+)", status).group(1), 16) == wanted
    # ...and it still reads its guest: a report comes.
    from pagefusion.worker import read_report

    assert testbed.eventually(lambda: read_report(dom.UUIDString()), 15.0)


def test_the_native_core_has_no_way_to_write_another_process():
    source = "\n".join(p.read_text() for p in NATIVE.glob("*.[ch]"))
    code = re.sub(r"/\*.*?\*/", "", source, flags=re.S)  # comments may name them
    for forbidden in ("process_vm_writev", "ptrace", "O_RDWR", "O_WRONLY", "pwrite"):
        assert forbidden not in code, forbidden


def test_state_index_and_key_are_root_only(guest_factory, running_daemon):
    dom = guest_factory.boot(guest_factory.spec(ON))
    assert testbed.eventually(lambda: supervision.worker_pid(dom.UUIDString()), 10.0)
    index = paths.RUN_DIR / "index" / "pftest"
    assert testbed.eventually(lambda: any(index.glob("*.fp")), 10.0)

    loose = []
    for top in (paths.RUN_DIR, paths.STATE_DIR):
        for entry in [top, *top.rglob("*")]:
            info = entry.lstat()
            if info.st_uid != 0 or info.st_mode & 0o077:
                loose.append(f"{entry} {stat.filemode(info.st_mode)} uid {info.st_uid}")
    assert loose == []
    assert (paths.RUN_DIR / "fingerprint.key").stat().st_size == 16


def test_fingerprints_differ_under_another_key(tmp_path):
    from pagefusion import scanner

    page = os.urandom(4096) * 2
    one = scanner.fingerprint_buffer(b"k" * 16, page)
    other = scanner.fingerprint_buffer(b"K" * 16, page)
    assert one[0] == one[1]
    assert one[0] != other[0]
