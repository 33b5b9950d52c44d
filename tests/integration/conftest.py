"""Fixtures for tests against the real libvirtd: the daemon, shared guests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagefusion import daemon as pf_daemon


class DaemonProcess:
    """pagefusion's daemon as a real process, its log kept for the tests."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the daemon unless this one already runs; wait until it watches events."""
        existing = pf_daemon.daemon_pid()
        if self.running() and existing == self.process.pid:
            return
        if existing is not None and (self.process is None or existing != self.process.pid):
            os.kill(existing, signal.SIGTERM)
            self._wait_gone()
        # Only what this start writes counts: the log keeps earlier runs.
        log_start = len(self.log())
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pagefusion.cli", "daemon"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while "watching domain events" not in self.log()[log_start:]:
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, "daemon did not connect: " + self.log()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self._wait_gone()

    def _wait_gone(self) -> None:
        deadline = time.monotonic() + 20
        while pf_daemon.daemon_pid() is not None:
            assert time.monotonic() < deadline, "daemon did not stop"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def pf_daemon_process(libvirt_conn, tmp_path_factory):
    process = DaemonProcess(tmp_path_factory.mktemp("daemon") / "daemon.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture
def running_daemon(pf_daemon_process):
    """The daemon, started again if a test stopped it."""
    pf_daemon_process.start()
    return pf_daemon_process
