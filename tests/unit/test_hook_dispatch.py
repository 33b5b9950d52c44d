"""The hook's contract with libvirtd, checked without libvirtd.

The hook script is run as libvirtd runs it: a separate process with argv and
the domain XML on stdin, its state kept in a temporary directory. Each test
runs twice: with a daemon serving the calls (its hook server in this
process) and without one (the hook runs the call itself).
"""

from __future__ import annotations

import io
import logging
import re
import shlex
import subprocess
import sys

import pytest

from pagefusion import hook, hookserver, journal, ledger, runstate
from pagefusion.element import NAMESPACE, STAMP_NAMESPACE, PageFusion

UUID = "0d2b7c1e-5a4f-4c3e-9b1a-2f6e8d7c9a01"


def domain_xml(
    state: str | None = "on",
    nosharepages: bool = False,
    name: str = "vm1",
    group: str | None = None,
    stamp: str = "",
) -> str:
    """A domain XML; ``stamp`` gives the running stamp's attributes, if any."""
    grouped = f' group="{group}"' if group else ""
    element = f'<p:page-fusion xmlns:p="{NAMESPACE}" state="{state}"{grouped}/>' if state else ""
    if stamp:
        element += f'<r:running xmlns:r="{STAMP_NAMESPACE}" {stamp}/>'
    backing = "<memoryBacking><nosharepages/></memoryBacking>" if nosharepages else ""
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>{UUID}</uuid>"
        f"<metadata>{element}</metadata>{backing}</domain>"
    )


@pytest.fixture(params=["daemon", "own process"])
def run_hook(request, hook_script):
    server = None
    if request.param == "daemon":
        server = hookserver.HookServer()
        server.start()

    def run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        served_before = server.served if server else 0
        done = subprocess.run(
            [str(hook_script), *argv], input=stdin, capture_output=True, text=True, timeout=30
        )
        if server is not None:
            assert server.served == served_before + 1, "the daemon did not serve the call"
        return done

    yield run
    if server is not None:
        server.stop()


def test_prepare_records_the_value_the_domain_starts_with(run_hook):
    done = run_hook("vm1", "prepare", "begin", "-", stdin=domain_xml("on"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    record = runstate.load(UUID)
    assert record.enabled and record.phase == runstate.PHASE_PREPARED


def test_prepare_refuses_a_bad_element_with_one_line(run_hook):
    done = run_hook("vm1", "prepare", "begin", "-", stdin=domain_xml("sometimes"))
    assert done.returncode == 1
    refusal = [line for line in done.stderr.splitlines() if line.startswith("pagefusion:")]
    assert refusal == [
        "pagefusion: domain 'vm1': page-fusion state 'sometimes' is not valid; use 'on' or 'off'"
    ]
    assert "Traceback" not in done.stderr
    assert runstate.load(UUID) is None


def test_prepare_refuses_page_fusion_off_on_mergeable_memory(run_hook):
    done = run_hook("vm1", "prepare", "begin", "-", stdin=domain_xml("off", nosharepages=False))
    assert done.returncode == 1
    assert "pagefusion set vm1 off" in done.stderr


def test_the_advice_quotes_a_domain_name_for_the_shell(run_hook):
    name = "lab vm 'one'"
    xml = domain_xml("on", nosharepages=True, name="lab vm &apos;one&apos;")
    done = run_hook(name, "prepare", "begin", "-", stdin=xml)
    assert done.returncode == 1
    assert f'"pagefusion set {shlex.quote(name)} on"' in done.stderr, done.stderr


@pytest.mark.parametrize("operation", ["reconnect", "attach", "started", "stopped", "release"])
def test_operations_that_must_not_fail_pass_on_garbage(run_hook, operation):
    done = run_hook("vm1", operation, "begin", "-", stdin="<not xml")
    assert done.returncode == 0
    assert done.stdout == ""


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_migrate_and_restore_print_nothing_when_they_keep_the_xml(run_hook, operation):
    done = run_hook("vm1", operation, "begin", "-", stdin=domain_xml("on"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def refusal_of(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("pagefusion:")]


def test_migrate_accepts_the_element_the_guest_runs_with(run_hook):
    xml = domain_xml("on", group="lab", stamp='state="on" group="lab"')
    done = run_hook("vm1", "migrate", "begin", "-", stdin=xml)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("state", "group", "nosharepages", "ran_with", "says"),
    [
        ("on", "other", False, "on (group 'lab')", "on (group 'other')"),
        ("off", None, True, "on (group 'lab')", "off"),
    ],
)
def test_migrate_refuses_an_element_changed_on_the_way(
    run_hook, state, group, nosharepages, ran_with, says
):
    xml = domain_xml(state, nosharepages, group=group, stamp='state="on" group="lab"')
    done = run_hook("vm1", "migrate", "begin", "-", stdin=xml)
    assert done.returncode == 1
    assert refusal_of(done) == [
        f"pagefusion: domain 'vm1' runs with page fusion {ran_with} on the source host,"
        f" but the incoming XML says {says}; migrate it with the XML it runs with, and"
        " change page fusion while it is shut off"
    ]
    assert "Traceback" not in done.stderr


def test_migrate_refuses_a_bad_stamp_with_one_line(run_hook):
    done = run_hook("vm1", "migrate", "begin", "-", stdin=domain_xml("on", stamp='state="2"'))
    assert done.returncode == 1
    assert len(refusal_of(done)) == 1 and "'2' is not valid" in done.stderr


def test_migrate_without_a_stamp_checks_the_merge_setting_only(run_hook):
    done = run_hook("vm1", "migrate", "begin", "-", stdin=domain_xml("on", group="any"))
    assert done.returncode == 0, done.stderr
    done = run_hook("vm1", "migrate", "begin", "-", stdin=domain_xml("on", nosharepages=True))
    assert done.returncode == 1 and "forbids merging" in done.stderr


def test_restore_elsewhere_compares_with_the_stamp(run_hook):
    changed = domain_xml("on", group="b", stamp='state="on" group="a"')
    done = run_hook("vm1", "restore", "begin", "-", stdin=changed)
    assert done.returncode == 1
    assert "was saved while running with page fusion on (group 'a')" in done.stderr
    same = domain_xml("on", group="a", stamp='state="on" group="a"')
    assert run_hook("vm1", "restore", "begin", "-", stdin=same).returncode == 0


def test_restore_here_trusts_the_ledger_over_the_stamp(run_hook):
    entry = ledger.load(UUID)
    entry.name, entry.ran_with = "vm1", PageFusion(enabled=True, group="a")
    ledger.save(entry)
    forged = domain_xml("on", group="b", stamp='state="on" group="b"')
    done = run_hook("vm1", "restore", "begin", "-", stdin=forged)
    assert done.returncode == 1
    assert "was saved while running with page fusion on (group 'a')" in done.stderr


def test_unknown_operations_pass(run_hook):
    done = run_hook("vm1", "teleport", "begin", "-", stdin=domain_xml("on"))
    assert done.returncode == 0
    assert done.stdout == ""


def test_each_call_is_journaled_once(run_hook):
    for operation in ("prepare", "start", "started", "stopped", "release"):
        run_hook("vm1", operation, "begin", "-", stdin=domain_xml("on"))
    calls = journal.read()
    assert [c["operation"] for c in calls] == ["prepare", "start", "started", "stopped", "release"]
    assert {c["uuid"] for c in calls} == {UUID}


def test_the_hook_does_not_import_libvirt():
    code = "import sys, pagefusion.hook; print('libvirt' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False"


def test_in_process_dispatch_of_reconnect_never_raises(private_paths, monkeypatch):
    def explode(call):
        raise RuntimeError("boom")

    monkeypatch.setitem(hook.HANDLERS, "reconnect", explode)
    assert hook.main(["vm1", "reconnect", "begin", "-"], io.StringIO(domain_xml())) == 0


def test_each_call_logs_one_line_with_its_verdict(private_paths, caplog):
    caplog.set_level(logging.INFO, logger="pagefusion")
    hook.handle(["vm1", "prepare", "begin", "-"], domain_xml("on"))
    hook.handle(["vm1", "prepare", "begin", "-"], domain_xml("sometimes"), hook.SERVED_BY_DAEMON)

    lines = [r.getMessage() for r in caplog.records if r.name == "pagefusion.hook"]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"domain 'vm1' prepare begin: ok \(\d+ ms, hook process\)", lines[0])
    assert re.fullmatch(r"domain 'vm1' prepare begin: refused \(\d+ ms, daemon\)", lines[1])
