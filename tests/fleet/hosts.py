"""Libvirt hosts for fleet tests, several on this one machine.

Each host is a private mount namespace (``unshare --mount --propagation
private``) in which per-host directories are bind-mounted over the paths a
libvirt host keeps to itself:

    /run                 libvirtd's and virtlogd's pidfiles and sockets, sshd's
                         privilege-separation dir, pagefusion's domain records
    /etc/libvirt         libvirt's configuration and the hook directory
    /var/lib/libvirt     domain state and the guest images
    /var/log/libvirt     domain logs and guest consoles
    /var/cache/libvirt   QEMU capabilities
    /var/lib/pagefusion  the hook journal and the saved KSM settings
    /opt/pagefusion      the virtual environment the role installs

A whole /run rather than /run/libvirt alone: libvirtd keeps its pidfile in
/run/libvirtd.pid, and pagefusion restarts libvirtd through that pidfile, so
with a private /run the role's ordinary restart reaches the host's own
libvirtd and never the machine's.

A keeper process holds the namespace open; virtlogd, libvirtd (under ``tini
-s``) and an sshd on a loopback port are started inside it with ``nsenter``,
so everything the role does over SSH happens inside the host. Processes stay
in the machine's PID namespace: the host is stopped by signalling every
process whose mount namespace is the keeper's. The kernel, and so KSM, stay
one per machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from pagefusion import services

log = logging.getLogger(__name__)

# Machine path -> name of the per-host directory mounted over it.
PRIVATE_DIRS = {
    "/run": "run",
    "/etc/libvirt": "etc-libvirt",
    "/var/lib/libvirt": "lib-libvirt",
    "/var/log/libvirt": "log-libvirt",
    "/var/cache/libvirt": "cache-libvirt",
    "/var/lib/pagefusion": "lib-pagefusion",
    "/opt/pagefusion": "opt-pagefusion",
}
KEEPER_NAME = "pagefusion-fleet-keeper"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

# Mount every (source, target) pair given as arguments, say so, then wait.
KEEPER_SCRIPT = """set -e
while [ "$#" -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done
echo ready
while :; do sleep 3600; done
"""

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile /run/sshd.pid
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
"""


class HostStartError(RuntimeError):
    """A fleet host did not come up; the message says which part and where to look."""


def free_loopback_port(first: int = 2201, last: int = 2299) -> int:
    """The first port in [first, last] that nothing listens on at 127.0.0.1."""
    for port in range(first, last + 1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise HostStartError(f"no free loopback port between {first} and {last}")


def _copy_skeleton(source: Path, target: Path, depth: int) -> None:
    """Recreate the directories under ``source`` (owners, modes), without files."""
    for entry in sorted(source.iterdir()) if source.is_dir() else []:
        if not entry.is_dir() or entry.is_symlink() or entry.name.startswith("domain-"):
            continue
        made = target / entry.name
        made.mkdir(exist_ok=True)
        info = entry.stat()
        os.chown(made, info.st_uid, info.st_gid)
        made.chmod(info.st_mode & 0o7777)
        if depth > 1:
            _copy_skeleton(entry, made, depth - 1)


def _answers(address: Path | int) -> bool:
    """Whether something accepts connections on a Unix socket path or a loopback port."""
    unix = isinstance(address, Path)
    with socket.socket(socket.AF_UNIX if unix else socket.AF_INET) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(address) if unix else ("127.0.0.1", address))
        except OSError:
            return False
    return True


def _wait_for(check, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise HostStartError(f"{what} did not happen within {timeout_s:.0f} s")


@dataclass
class NamespaceHost:
    """One libvirt host in its own mount namespace, reachable over SSH."""

    name: str
    root: Path
    ssh_port: int
    authorized_keys: Path
    keeper: subprocess.Popen | None = None
    spawned: list[subprocess.Popen] = field(default_factory=list)

    # Paths as the machine sees them; inside the host they are the usual ones.

    def private(self, machine_path: str) -> Path:
        return self.root / PRIVATE_DIRS[machine_path]

    @property
    def libvirt_socket(self) -> Path:
        return self.private("/run") / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The URI that reaches this host's libvirtd from outside its namespace."""
        return _uri_of(self.root)

    @property
    def hook_path(self) -> Path:
        return self.private("/etc/libvirt") / "hooks" / "qemu.d" / "pagefusion"

    @property
    def venv_python(self) -> Path:
        return self.private("/opt/pagefusion") / "venv" / "bin" / "python"

    @property
    def image_dir(self) -> Path:
        return self.private("/var/lib/libvirt") / "images" / "pagefusion"

    @property
    def console_dir(self) -> Path:
        return self.private("/var/log/libvirt") / "qemu"

    def pid_from(self, pidfile: str) -> int | None:
        """A pid from a pidfile in the host's /run, if that process lives."""
        try:
            pid = int((self.private("/run") / pidfile).read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    # Life of the host.

    def start(self) -> None:
        self._prepare_dirs()
        self._start_keeper()
        services.fix_kvm_device()
        self.run_inside(["virtlogd", "-d"])
        self.start_libvirtd()
        self.start_sshd()
        log.info("fleet host %s up: ssh 127.0.0.1:%d, %s", self.name, self.ssh_port, self.uri)

    def _prepare_dirs(self) -> None:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        for machine_path, name in PRIVATE_DIRS.items():
            Path(machine_path).mkdir(parents=True, exist_ok=True)
            (self.root / name).mkdir(mode=0o755, exist_ok=True)

        # libvirt's configuration files, but none of the machine's domains,
        # networks or hooks: each host starts empty.
        etc = self.private("/etc/libvirt")
        for entry in Path("/etc/libvirt").iterdir():
            if entry.is_file():
                shutil.copy2(entry, etc / entry.name)
        # A UUID of its own: libvirt refuses to migrate to a host with its source's.
        host_uuid = uuid.uuid5(uuid.NAMESPACE_URL, str(self.root))
        with open(etc / "libvirtd.conf", "a") as conf:
            conf.write(f'\nhost_uuid = "{host_uuid}"\n')
        for machine_path, depth in (("/var/lib/libvirt", 3), ("/var/log/libvirt", 1)):
            _copy_skeleton(Path(machine_path), self.private(machine_path), depth)
        (self.private("/run") / "sshd").mkdir(mode=0o755, exist_ok=True)
        self.private("/var/lib/pagefusion").chmod(0o700)

        key = self.root / "ssh_host_ed25519_key"
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        (self.root / "sshd_config").write_text(
            SSHD_CONFIG.format(
                port=self.ssh_port, host_key=key, authorized_keys=self.authorized_keys
            )
        )

    def _start_keeper(self) -> None:
        pairs = []
        for machine_path, name in PRIVATE_DIRS.items():
            pairs += [str(self.root / name), machine_path]
        self.keeper = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--"]
            + ["sh", "-c", KEEPER_SCRIPT, KEEPER_NAME, *pairs],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        (self.root / "keeper.pid").write_text(f"{self.keeper.pid}\n")
        if self.keeper.stdout.readline().strip() != "ready":
            raise HostStartError(f"fleet host {self.name}: the namespace's bind mounts failed")

    def run_inside(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside the host's mount namespace and wait for it."""
        kwargs.setdefault("check", True)
        kwargs.setdefault("timeout", START_TIMEOUT_S)
        return subprocess.run(self._nsenter(argv), **kwargs)

    def _nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.keeper.pid}", "--mount", "--", *argv]

    def start_libvirtd(self) -> None:
        with open(self.private("/var/log/libvirt") / "libvirtd-fleet.log", "ab") as out:
            self.spawned.append(
                subprocess.Popen(
                    self._nsenter(["tini", "-s", "--", "libvirtd"]),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            )
        _wait_for(
            lambda: self.pid_from("libvirtd.pid") and _answers(self.libvirt_socket),
            f"fleet host {self.name}: libvirtd answering on {self.libvirt_socket}",
        )

    def start_sshd(self) -> None:
        self.run_inside(["/usr/sbin/sshd", "-f", str(self.root / "sshd_config")])
        _wait_for(
            lambda: _answers(self.ssh_port),
            f"fleet host {self.name}: sshd listening on 127.0.0.1:{self.ssh_port}",
        )

    def stop_sshd(self) -> None:
        """Stop the host's sshd and its sessions: the host becomes unreachable."""
        for pid in self.processes():
            if _comm(pid) == "sshd":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        _wait_for(
            lambda: not _answers(self.ssh_port),
            f"fleet host {self.name}: sshd gone from 127.0.0.1:{self.ssh_port}",
            STOP_TIMEOUT_S,
        )

    def processes(self) -> list[int]:
        """Every process in the host's mount namespace, the keeper included."""
        if self.keeper is None:
            return []
        return processes_in_namespace_of(self.keeper.pid)

    def stop(self) -> None:
        """End every process of the host: guests, daemons, sshd, the keeper."""
        if self.keeper is not None:
            stop_host(self.root, self.keeper.pid)
            self.keeper.wait(timeout=STOP_TIMEOUT_S)
        for child in self.spawned:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=STOP_TIMEOUT_S)
        self.spawned.clear()


def _uri_of(root: Path) -> str:
    socket_path = root / PRIVATE_DIRS["/run"] / "libvirt" / "libvirt-sock"
    return f"qemu+unix:///system?socket={socket_path}"


def _qemu_pids(root: Path) -> list[int]:
    """Pids of a host's running QEMU processes, from libvirt's pidfiles."""
    found = []
    for pidfile in (root / PRIVATE_DIRS["/run"] / "libvirt" / "qemu").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, 0)
            found.append(pid)
    return found


def stop_host(root: Path, keeper_pid: int | None) -> None:
    """End every process of the host kept in ``root`` whose keeper is ``keeper_pid``."""
    # libvirt starts each QEMU in a mount namespace of its own, so guests are
    # not found through the keeper's: destroy them through libvirt, and kill
    # what libvirt could not.
    _destroy_guests(_uri_of(root))
    for pid in _qemu_pids(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if keeper_pid is not None:
        stop_namespace_of(keeper_pid)


def _destroy_guests(uri: str) -> None:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        log.warning("cannot reach %s to destroy its guests: %s", uri, err)
        return
    with contextlib.closing(conn):
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def processes_in_namespace_of(pid: int) -> list[int]:
    """Pids of every process sharing the mount namespace of ``pid``."""
    namespace = _mount_namespace(pid)
    if namespace is None or namespace == _mount_namespace(os.getpid()):
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _mount_namespace(int(entry.name)) == namespace:
            found.append(int(entry.name))
    return found


def stop_namespace_of(pid: int) -> None:
    """SIGTERM every process in the mount namespace of ``pid``; SIGKILL stragglers."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        targets = processes_in_namespace_of(pid)
        if not targets:
            return
        for target in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and processes_in_namespace_of(pid):
            time.sleep(0.1)


def stop_leftover_hosts(base: Path) -> None:
    """Stop the hosts of an earlier run that was killed before it could clean up."""
    for pidfile in base.glob("*/*/keeper.pid"):
        keeper_pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if KEEPER_NAME in Path(f"/proc/{pid}/cmdline").read_text():
                keeper_pid = pid
        stop_host(pidfile.parent, keeper_pid)
        shutil.rmtree(pidfile.parent.parent, ignore_errors=True)
