"""Running the collection's playbooks with the real ``ansible-playbook``.

Each run's whole output is kept in a log file of the fleet, and its PLAY
RECAP is parsed, so that tests assert per host what Ansible itself counted.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
RUN_TIMEOUT_S = 600
TAIL_CHARS = 6000

# "fleet1   : ok=14   changed=0    unreachable=0    failed=0 ..."
RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:[a-z]+=\d+\s*)+)$")

_run_numbers = itertools.count(1)


@dataclass
class PlaybookRun:
    argv: list[str]
    returncode: int
    output: str
    log_path: Path
    duration_s: float
    recap: dict[str, dict[str, int]]

    def count(self, host: str, what: str) -> int:
        """One figure of the recap (ok, changed, unreachable, failed, ...) for a host."""
        assert host in self.recap, self.describe(f"{host} is not in the play recap")
        return self.recap[host][what]

    def changed(self, host: str) -> int:
        return self.count(host, "changed")

    def describe(self, problem: str) -> str:
        """A failure message: the problem, the command, and the end of its output."""
        return (
            f"{problem}\n$ {' '.join(self.argv)}  (exit {self.returncode}, full output in"
            f" {self.log_path})\n...{self.output[-TAIL_CHARS:]}"
        )

    def assert_succeeded(self) -> None:
        assert self.returncode == 0, self.describe("ansible-playbook failed")


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    recap: dict[str, dict[str, int]] = {}
    _before, found, after = output.rpartition("PLAY RECAP")
    if not found:
        return recap
    for line in after.splitlines():
        match = RECAP_LINE.match(line.strip())
        if match:
            counts = (pair.split("=") for pair in match["counts"].split())
            recap[match["host"]] = {key: int(value) for key, value in counts}
    return recap


def run_playbook(
    playbook: str, *args: str, env: dict[str, str], log_dir: Path, cwd: Path
) -> PlaybookRun:
    """Run ``ansible-playbook PLAYBOOK ARGS...`` and return what it did."""
    argv = [str(ANSIBLE_PLAYBOOK), playbook, *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{next(_run_numbers):02d}-{playbook.rsplit('.', 1)[-1]}.log"

    started = time.monotonic()
    completed = subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    duration_s = time.monotonic() - started
    log_path.write_text(f"$ {' '.join(argv)}\n{completed.stdout}")
    return PlaybookRun(
        argv=argv,
        returncode=completed.returncode,
        output=completed.stdout,
        log_path=log_path,
        duration_s=duration_s,
        recap=parse_recap(completed.stdout),
    )
