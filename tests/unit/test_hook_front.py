"""The hook's native front against daemons that are there, frozen, or die.

The front must give libvirtd the same answer whatever the daemon does: when
the daemon cannot take a call the front runs the Python hook itself, and a
call is never run twice.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time

import pytest

from pagefusion import hookserver, journal, runstate
from pagefusion.element import NAMESPACE

UUID = "5b0c1f7e-2d3a-4e5f-8a9b-0c1d2e3f4a5b"
XML = (
    f"<domain type='qemu'><name>vm1</name><uuid>{UUID}</uuid><metadata>"
    f'<p:page-fusion xmlns:p="{NAMESPACE}" state="on"/></metadata></domain>'
)


@pytest.fixture
def server(private_paths):
    """A daemon's hook server, in this process."""
    serving = hookserver.HookServer()
    serving.start()
    try:
        yield serving
    finally:
        serving.stop()


def connect(server) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(server.path))
    return client


def call(script, *argv: str, stdin: str = XML) -> tuple[subprocess.CompletedProcess, float]:
    began = time.monotonic()
    done = subprocess.run(
        [str(script), *argv], input=stdin, capture_output=True, text=True, timeout=30
    )
    return done, time.monotonic() - began


def listen(path) -> socket.socket:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    return listener


def test_a_served_call_runs_once_in_the_daemon(hook_script, server):
    done, _ = call(hook_script, "vm1", "prepare", "begin", "-")
    assert done.returncode == 0, done.stderr
    assert server.served == 1
    assert runstate.load(UUID).phase == runstate.PHASE_PREPARED
    assert [c["operation"] for c in journal.read()] == ["prepare"]


def test_a_refusal_reaches_libvirt_through_the_daemon(hook_script, server):
    bad = XML.replace('state="on"', 'state="maybe"')
    done, _ = call(hook_script, "vm1", "prepare", "begin", "-", stdin=bad)
    assert done.returncode == 1
    assert done.stderr.startswith("pagefusion: domain 'vm1': page-fusion state 'maybe'")
    assert server.served == 1


def test_the_socket_is_root_only(private_paths):
    server = hookserver.HookServer()
    server.start()
    try:
        assert server.path.stat().st_mode & 0o777 == 0o600
        assert server.path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        server.stop()
    assert not server.path.exists()


def test_a_frozen_daemon_costs_half_a_second_and_the_call_still_runs(hook_script):
    # A daemon stopped with SIGSTOP: the kernel queues the connection, nobody answers.
    listener = listen(hookserver.socket_path())
    try:
        done, took = call(hook_script, "vm1", "prepare", "begin", "-")
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr
    assert runstate.load(UUID).phase == runstate.PHASE_PREPARED
    assert 0.5 <= took < 5.0


def test_a_daemon_that_dies_with_the_call_leaves_it_to_the_front(hook_script):
    listener = listen(hookserver.socket_path())

    def take_and_die():
        conn, _ = listener.accept()
        conn.settimeout(5)
        hookserver.read_call(conn)
        conn.sendall(b"R")
        assert conn.recv(1) == b"G"
        conn.close()  # dies before it answers

    dying = threading.Thread(target=take_and_die)
    dying.start()
    try:
        done, _ = call(hook_script, "vm1", "prepare", "begin", "-")
    finally:
        dying.join(10)
        listener.close()
    assert done.returncode == 0, done.stderr
    assert runstate.load(UUID).phase == runstate.PHASE_PREPARED
    assert len(journal.read()) == 1


def test_a_call_the_front_gave_up_on_is_not_run(server):
    client = connect(server)
    argv = [b"vm1", b"prepare", b"begin", b"-"]
    parts = [b"PFH1", struct.pack("=I", len(argv))]
    for arg in (*argv, XML.encode()):
        parts += [struct.pack("=I", len(arg)), arg]
    client.sendall(b"".join(parts))
    assert client.recv(1) == b"R"
    client.close()  # no 'G': the front runs the call itself
    time.sleep(0.3)
    assert server.served == 0
    assert runstate.load(UUID) is None
    assert journal.read() == []


def test_garbage_on_the_socket_is_dropped(server):
    client = connect(server)
    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    client.settimeout(5)
    try:
        answer = client.recv(1)
    except ConnectionResetError:  # closed with our bytes unread
        answer = b""
    assert answer == b""  # closed on us, no answer
    client.close()
    assert server.served == 0
