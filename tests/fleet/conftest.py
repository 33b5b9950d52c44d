"""Fixtures of the fleet tests: three libvirt hosts on this machine, the built
collection installed for them, and the playbooks run with ``ansible-playbook``.

The session's fleet is built once: the collection is built with
``scripts/build-collection.sh`` and installed into a private collections
path, each host (see ``hosts.py``) gets a copy of the guest image and one or
two tiny TCG guests, all shut off with page fusion off, and an inventory
names the hosts by their loopback SSH ports. Whatever happens, the hosts are
stopped at the end (guests destroyed, daemons ended), KSM's tunables are put
back and the fleet's folder is removed; the playbooks' output is kept in
pytest's temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hosts
import libvirt
import playbook
import pytest
import testbed

from pagefusion import guestimage, guests, settings
from pagefusion.connection import open_connection
from pagefusion.element import PageFusion

REPO = Path(__file__).resolve().parents[2]
FLEET_TESTS = Path(__file__).resolve().parent
FLEET_BASE = Path("/var/tmp/pagefusion-fleet")
# Host name -> how many guests it gets.
GUEST_COUNTS = {"fleet1": 2, "fleet2": 1, "fleet3": 1}
GROUP = "fleet"
HOST_PYTHON = "/opt/pagefusion/venv/bin/python"
TOOLS = ("unshare", "nsenter", "tini", "ssh", "ssh-keygen", "git", "/usr/sbin/sshd")

ANSIBLE_CFG = """\
[defaults]
inventory = {base}/inventory.yml
collections_path = {base}/collections
local_tmp = {base}/ansible-tmp
host_key_checking = False
retry_files_enabled = False
forks = 10
nocolor = True

[ssh_connection]
pipelining = True
control_path_dir = {base}/cp
ssh_args = -o ControlMaster=auto -o ControlPersist=30s -o UserKnownHostsFile=/dev/null
    -o StrictHostKeyChecking=no -o LogLevel=ERROR
"""


def unavailable_reason() -> str | None:
    """Why a fleet cannot be built here, or None if it can."""
    reason = testbed.libvirtd_unavailable_reason()
    if reason:
        return reason
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    if not playbook.ANSIBLE_PLAYBOOK.exists():
        return f"ansible-core is not installed beside {sys.executable} (scripts/setup.sh --test)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"no fleet here: {reason}")
    for item in items:
        if "fleet" in item.keywords:
            item.add_marker(skip)


@dataclass
class Fleet:
    base: Path
    log_dir: Path
    env: dict[str, str]
    group: str = GROUP
    hosts: list[hosts.NamespaceHost] = field(default_factory=list)
    guests: dict[str, list[str]] = field(default_factory=dict)
    _connections: dict[str, libvirt.virConnect] = field(default_factory=dict)

    def host(self, name: str) -> hosts.NamespaceHost:
        return next(host for host in self.hosts if host.name == name)

    def playbook(self, name: str, *args: str) -> playbook.PlaybookRun:
        """Run the collection's playbook ``name`` against the fleet."""
        return playbook.run_playbook(
            f"pagefusion.libvirt.{name}", *args, env=self.env, log_dir=self.log_dir, cwd=self.base
        )

    def connect(self, host: hosts.NamespaceHost) -> libvirt.virConnect:
        """A connection to the host's libvirtd, opened again after libvirtd restarted."""
        conn = self._connections.get(host.name)
        if conn is not None:
            try:
                conn.getLibVersion()
                return conn
            except libvirt.libvirtError:
                pass
        conn = self._connections[host.name] = open_connection(host.uri)
        return conn

    def domain(self, host: hosts.NamespaceHost, name: str) -> libvirt.virDomain:
        return self.connect(host).lookupByName(name)

    def page_fusion(self, host: hosts.NamespaceHost, name: str) -> PageFusion:
        """The setting of a guest's persistent definition, read from its libvirtd."""
        return settings.read(self.domain(host, name)).persistent

    @contextlib.contextmanager
    def guest_running(self, host_name: str, index: int = 0):
        """A guest of the host, running for the duration; destroyed again after."""
        host = self.host(host_name)
        dom = self.domain(host, self.guests[host.name][index])
        if not dom.isActive():
            dom.create()
        try:
            yield host, dom
        finally:
            if dom.isActive():
                dom.destroy()

    def close(self) -> None:
        for conn in self._connections.values():
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._connections.clear()


def _build_collection(fleet: Fleet) -> None:
    dist = fleet.base / "dist"
    subprocess.run(
        [str(REPO / "scripts" / "build-collection.sh"), str(dist)],
        env=fleet.env,
        check=True,
        capture_output=True,
    )
    archive = next(dist.glob("pagefusion-libvirt-*.tar.gz"))
    galaxy = playbook.ANSIBLE_PLAYBOOK.with_name("ansible-galaxy")
    subprocess.run(
        [str(galaxy), "collection", "install", "-p", str(fleet.base / "collections"), str(archive)],
        env=fleet.env,
        check=True,
        capture_output=True,
    )


def _add_guests(fleet: Fleet, host: hosts.NamespaceHost, image: guestimage.GuestImage) -> None:
    # The image keeps its path: inside the host, /var/lib/libvirt is the host's own.
    host.image_dir.mkdir(parents=True, exist_ok=True)
    for part in (image.kernel, image.initrd):
        # Contents only: libvirt records its owner bookkeeping in the files'
        # extended attributes, which must not come along from the machine's.
        shutil.copyfile(part, host.image_dir / part.name)
        (host.image_dir / part.name).chmod(0o644)
    names = [f"{host.name}-{letter}" for letter in "ab"[: GUEST_COUNTS[host.name]]]
    for name in names:
        guests.define(fleet.connect(host), guests.GuestSpec(name, PageFusion()), image)
    fleet.guests[host.name] = names


def _write_inventory(fleet: Fleet, key: Path) -> None:
    inventory = {
        "all": {
            "vars": {
                "ansible_user": "root",
                "ansible_host": "127.0.0.1",
                "ansible_ssh_private_key_file": str(key),
                # Discovery would find a shell shim that fails over SSH here.
                "ansible_python_interpreter": "/usr/bin/python3",
                "pagefusion_host_python": HOST_PYTHON,
            },
            "hosts": {
                host.name: {
                    "ansible_port": host.ssh_port,
                    "pagefusion_enable_domains": [
                        {"name": name, "state": "on", "group": fleet.group}
                        for name in fleet.guests[host.name]
                    ],
                }
                for host in fleet.hosts
            },
        }
    }
    (fleet.base / "inventory.yml").write_text(json.dumps(inventory, indent=2))
    (fleet.base / "ansible.cfg").write_text(ANSIBLE_CFG.format(base=fleet.base))


def _build(fleet: Fleet) -> None:
    ssh_dir = fleet.base / "ssh"
    ssh_dir.mkdir(mode=0o700)
    key = ssh_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized_keys = ssh_dir / "authorized_keys"
    shutil.copy(key.with_suffix(".pub"), authorized_keys)

    _build_collection(fleet)
    image = guestimage.ensure_image()
    for name in GUEST_COUNTS:
        host = hosts.NamespaceHost(
            name=name,
            root=fleet.base / name,
            ssh_port=hosts.free_loopback_port(),
            authorized_keys=authorized_keys,
        )
        fleet.hosts.append(host)
        host.start()
        _add_guests(fleet, host, image)
    _write_inventory(fleet, key)


def _stop_fleet(fleet: Fleet) -> None:
    fleet.close()
    for host in fleet.hosts:
        host.stop()


# The fleet's hosts run pagefusion daemons of their own, which pace the
# machine's one KSM and take the metrics port: they are stopped as soon as the
# last fleet test is done, not at the end of the session, so that they never
# run beside the tests of this machine's own libvirtd.
_fleet_teardowns: list[contextlib.ExitStack] = []


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if nextitem is not None and FLEET_TESTS in nextitem.path.parents:
        return
    while _fleet_teardowns:
        _fleet_teardowns.pop().close()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory):
    FLEET_BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    hosts.stop_leftover_hosts(FLEET_BASE)
    base = Path(tempfile.mkdtemp(prefix="run-", dir=FLEET_BASE))
    base.chmod(0o755)
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(base / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        PATH=f"{playbook.ANSIBLE_PLAYBOOK.parent}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    built = Fleet(base=base, log_dir=tmp_path_factory.mktemp("fleet-logs"), env=env)

    # Whatever happens, undone in reverse: hosts stopped, folder removed,
    # KSM's tunables put back. Closing twice does nothing the second time.
    teardown = contextlib.ExitStack()
    teardown.enter_context(testbed.ksm_settings_restored())
    teardown.callback(shutil.rmtree, base, ignore_errors=True)
    teardown.callback(_stop_fleet, built)
    _fleet_teardowns.append(teardown)
    with teardown:
        _build(built)
        yield built


@dataclass
class Deployment:
    run: playbook.PlaybookRun
    libvirtd_pids: dict[str, int | None]


@pytest.fixture(scope="session")
def deployed(fleet) -> Deployment:
    """The fleet after its first deploy; the run says what it did."""
    pids = {host.name: host.pid_from("libvirtd.pid") for host in fleet.hosts}
    run = fleet.playbook("deploy")
    run.assert_succeeded()
    return Deployment(run=run, libvirtd_pids=pids)


@pytest.fixture(scope="session")
def enabled(fleet, deployed) -> playbook.PlaybookRun:
    """The fleet after page fusion was turned on for every guest, two hosts at a time."""
    run = fleet.playbook("enable", "-e", "pagefusion_enable_serial=2")
    run.assert_succeeded()
    return run


@pytest.fixture
def running_guest(fleet, deployed):
    """A guest of fleet2, running; destroyed again after the test."""
    with fleet.guest_running("fleet2") as running:
        yield running
