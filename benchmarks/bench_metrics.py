"""CPU time to read every metric for 50 running domains.

Fifty real processes stand in for QEMU (their /proc/PID/ksm_stat is real),
with pagefusion's records and worker reports for them in a private state
directory. Measured side by side: one ``metrics.collect()``, and one full
Prometheus exposition of the same figures.

    /opt/pagefusion/venv/bin/python benchmarks/bench_metrics.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from dataclasses import asdict
from pathlib import Path

DOMAINS = 50
ROUNDS = 50

run_dir = Path(tempfile.mkdtemp(prefix="pagefusion-bench-"))
os.environ["PAGEFUSION_RUN_DIR"] = str(run_dir / "run")
os.environ["PAGEFUSION_STATE_DIR"] = str(run_dir / "state")

from prometheus_client import generate_latest  # noqa: E402

from pagefusion import exporter, metrics, runstate, worker  # noqa: E402


def main() -> None:
    children = [subprocess.Popen(["sleep", "600"]) for _ in range(DOMAINS)]
    try:
        for index, child in enumerate(children):
            uuid = str(uuidlib.uuid4())
            record = runstate.DomainRecord(
                name=f"bench-{index}", uuid=uuid, enabled=index % 5 != 0, group="bench",
                phase=runstate.PHASE_RUNNING, qemu_pid=child.pid,
            )  # fmt: skip
            runstate.save(record)
            report = worker.Report(
                uuid=uuid, name=record.name, group="bench", qemu_pid=child.pid,
                worker_pid=os.getpid(), pages_total=65536, cycles=3, settled=True,
                cycle={name: 1000 for name in worker.CYCLE_FIELDS},
            )  # fmt: skip
            runstate.write_atomically(worker.report_path(uuid), json.dumps(asdict(report)))

        registry = exporter.registry()
        assert len(metrics.collect().domains) == DOMAINS
        results = {}
        for label, action in (
            ("metrics.collect()", metrics.collect),
            ("Prometheus exposition", lambda: generate_latest(registry)),
        ):
            started = time.process_time()
            for _ in range(ROUNDS):
                action()
            results[label] = (time.process_time() - started) / ROUNDS * 1000
    finally:
        for child in children:
            child.kill()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"{DOMAINS} running domains, CPU time per reading (mean of {ROUNDS}):")
    for label, ms in results.items():
        print(f"  {label:<24} {ms:6.1f} ms   (target < 100 ms, ratio {ms / 100:.2f})")


if __name__ == "__main__":
    sys.exit(main())
