"""Two page-fusion domains of different groups prepared at the same moment.

The group check and the record it is judged by must happen under the host
lock, or both starts see an empty host and both pass. The check is slowed
down here so that the two calls overlap for certain, once as hook calls the
daemon serves in threads of one process, once as two hook processes.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time

import pytest

from pagefusion import hookserver, lifecycle, runstate
from pagefusion.element import NAMESPACE

OVERLAP_S = 0.5
# In a hook process of its own the check is slowed by a wrapper run first.
SLOW_HOOK = f"""
import runpy, sys, time
from pagefusion import lifecycle
check = lifecycle.check_group
def slow_check(call):
    check(call)
    time.sleep({OVERLAP_S})
lifecycle.check_group = slow_check
sys.argv = ["pagefusion.hook", *sys.argv[1:]]
runpy.run_module("pagefusion.hook", run_name="__main__")
"""


def domain_xml(name: str, uuid: str, group: str) -> str:
    return (
        f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><metadata>"
        f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on" group="{group}"/>'
        "</metadata></domain>"
    )


DOMAINS = [
    ("race-a", "6a1f0e2d-0000-4000-8000-00000000000a", "group-a"),
    ("race-b", "6a1f0e2d-0000-4000-8000-00000000000b", "group-b"),
]


def prepare_both_at_once(argv_of) -> list[subprocess.CompletedProcess]:
    def prepare(domain):
        name, uuid, group = domain
        return subprocess.run(
            [*argv_of(name), "prepare", "begin", "-"],
            input=domain_xml(name, uuid, group),
            capture_output=True,
            text=True,
            timeout=60,
        )

    with concurrent.futures.ThreadPoolExecutor(len(DOMAINS)) as pool:
        return list(pool.map(prepare, DOMAINS))


def assert_exactly_one_passed(results: list[subprocess.CompletedProcess]) -> None:
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1], [(r.returncode, r.stderr) for r in results]
    refused = next(r for r in results if r.returncode == 1)
    assert "already run on this host" in refused.stderr
    prepared = [runstate.load(uuid) for _name, uuid, _group in DOMAINS]
    assert sum(1 for record in prepared if record is not None) == 1


@pytest.fixture
def slow_group_check(monkeypatch):
    check = lifecycle.check_group

    def slow_check(call):
        check(call)
        time.sleep(OVERLAP_S)

    monkeypatch.setattr(lifecycle, "check_group", slow_check)


def test_calls_served_by_the_daemon_do_not_both_pass(hook_script, slow_group_check):
    server = hookserver.HookServer()
    server.start()
    try:
        results = prepare_both_at_once(lambda name: [str(hook_script), name])
    finally:
        server.stop()
    assert server.served == 2
    assert_exactly_one_passed(results)


def test_hook_processes_do_not_both_pass(private_paths):
    results = prepare_both_at_once(lambda name: [sys.executable, "-c", SLOW_HOOK, name])
    assert_exactly_one_passed(results)
