"""The deploy playbook installs pagefusion on every host, once."""

from __future__ import annotations

import json

import pytest

from pagefusion import ksm, paths

pytestmark = [pytest.mark.fleet, pytest.mark.libvirt]


def test_deploy_installs_pagefusion_and_restarts_each_hosts_libvirtd(fleet, deployed):
    for host in fleet.hosts:
        assert deployed.run.count(host.name, "failed") == 0
        assert deployed.run.changed(host.name) > 0, deployed.run.describe(host.name)
        assert host.venv_python.exists()
        # The hook runs the host's venv: its python and the native front built into it.
        hook_text = host.hook_path.read_text()
        assert "python=/opt/pagefusion/venv/bin/python" in hook_text, hook_text
        assert "front=/opt/pagefusion/venv/lib/" in hook_text, hook_text
        # libvirtd reads its hooks only when it starts: the role restarted
        # the host's own libvirtd, and no other.
        assert host.pid_from("libvirtd.pid") not in (None, deployed.libvirtd_pids[host.name])


def test_deploy_leaves_each_hosts_libvirtd_running_the_hook(fleet, deployed):
    for host in fleet.hosts:
        name = fleet.guests[host.name][0]
        dom = fleet.domain(host, name)
        dom.create()
        dom.destroy()
        journal_path = host.private("/var/lib/pagefusion") / paths.hook_journal().name
        calls = [json.loads(line) for line in journal_path.read_text().splitlines()]
        operations = [call["operation"] for call in calls if call["domain"] == name]
        assert operations[-5:] == ["prepare", "start", "started", "stopped", "release"]


def test_deploy_second_run_changes_nothing(fleet, deployed):
    run = fleet.playbook("deploy")
    run.assert_succeeded()
    for host in fleet.hosts:
        assert run.changed(host.name) == 0, run.describe(f"{host.name} changed again")


def _hook_file(host) -> tuple[int, int, int]:
    info = host.hook_path.stat()
    return info.st_ino, info.st_mtime_ns, info.st_size


def test_deploy_in_check_mode_changes_nothing(fleet, deployed):
    # A tunable that pagefusion's pacing leaves alone, so that nothing else
    # on this machine moves it during the run.
    zero_pages = ksm.read_value("use_zero_pages")
    before = {host.name: (_hook_file(host), host.pid_from("libvirtd.pid")) for host in fleet.hosts}

    tunables = {"pagefusion_host_ksm_tunables": {"use_zero_pages": 1 - zero_pages}}
    run = fleet.playbook("deploy", "--check", "-e", json.dumps(tunables))

    run.assert_succeeded()
    for host in fleet.hosts:
        # The tunable would change on every host, and did not.
        assert run.changed(host.name) == 1, run.describe(host.name)
        assert (_hook_file(host), host.pid_from("libvirtd.pid")) == before[host.name]
    assert ksm.read_value("use_zero_pages") == zero_pages
