"""How fast fused memory appears, and at what CPU cost, for five ways of pacing KSM.

Run as root on a host with pagefusion installed (``scripts/setup.sh``), with
no other guests running:

    /opt/pagefusion/venv/bin/python benchmarks/bench_convergence.py [--window-s 600]

For each strategy, side by side in one run:

1. boot N guests from the same image (KSM stopped), each with identical data,
   data of its own and memory it keeps rewriting;
2. measure the achievable saving exactly (every page read twice), of
   non-zero pages: zero pages are counted apart by KSM (``use_zero_pages=1``
   for every strategy) and also freed by the kernel's huge page splits, so
   fused memory here is ``pages_sharing`` against non-zero duplicates;
3. phase 1, cold: clear KSM (``run=2``), apply the strategy, and record the
   time until 50% and 80% of the achievable saving is fused, and the CPU
   seconds of ksmd, pagefusion's workers and daemon over the window;
4. phase 2, late arrival: boot one more guest, and record the time until
   80% of the saving it brings is fused and the CPU spent in that window.

Strategies: pagefusion's pacing; KSM fixed-fast (5000 pages every 5 ms);
KSM's advisor (``advisor_mode=scan-time``); KSM's defaults (100 pages every
20 ms); and a naive reference that scans fixed-fast until ``pages_sharing``
stops growing, then drops to 100 pages every 200 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fusible_truth  # noqa: E402
import testbed  # noqa: E402

from pagefusion import guests, ksm, pacing, runstate, services, supervision  # noqa: E402
from pagefusion.daemon import daemon_pid  # noqa: E402
from pagefusion.element import PageFusion  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
GROUP = PageFusion(enabled=True, group="bench")
POLL_S = 0.25


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (threads included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def ksmd_pid() -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "ksmd":
                    return int(entry.name)
    raise SystemExit("no ksmd thread: is KSM built into this kernel?")


class CpuMeter:
    """CPU seconds of ksmd and of pagefusion's processes, which come and go,
    kept apart by part: ksmd, the daemon, the workers."""

    def __init__(self) -> None:
        self.ksmd = ksmd_pid()
        self.seen: dict[int, float] = {}
        self.start: dict[int, float] = {}
        self.part: dict[int, str] = {}

    def _ours(self) -> dict[int, str]:
        pids = {self.ksmd: "ksmd"}
        daemon = daemon_pid()
        if daemon:
            pids[daemon] = "daemon"
        for record in runstate.all_records():
            worker = supervision.worker_pid(record.uuid)
            if worker:
                pids[worker] = "workers"
        return pids

    def begin(self) -> None:
        self.seen.clear()
        self.part.clear()
        self.start = {pid: cpu_seconds(pid) for pid in self._ours()}
        self.sample()

    def sample(self) -> None:
        for pid, part in self._ours().items():
            self.start.setdefault(pid, 0.0)  # a process born in the window counts whole
            self.seen[pid] = max(self.seen.get(pid, 0.0), cpu_seconds(pid))
            self.part[pid] = part

    def total(self) -> float:
        return sum(self.by_part().values())

    def by_part(self) -> dict[str, float]:
        self.sample()
        parts = dict.fromkeys(("ksmd", "daemon", "workers"), 0.0)
        for pid, seen in self.seen.items():
            parts[self.part[pid]] += seen - self.start.get(pid, 0.0)
        return parts


def fused_pages() -> int:
    """Non-zero pages fused: zero pages are left out on both sides of the
    comparison, as the kernel also frees them by other means (huge page
    splits remap zero-filled parts to the zero page) that KSM does not count."""
    return ksm.read_value("pages_sharing")


class Naive:
    """The reference: fixed-fast until pages_sharing stops growing, then slow."""

    def __init__(self, quiet_s: float = 5.0) -> None:
        self.quiet_s = quiet_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        best, best_at = -1, time.monotonic()
        while not self.stop.wait(POLL_S):
            sharing = ksm.read_value("pages_sharing")
            if sharing > best:
                best, best_at = sharing, time.monotonic()
            elif time.monotonic() - best_at > self.quiet_s:
                ksm.write_value("pages_to_scan", 100)
                ksm.write_value("sleep_millisecs", 200)
                return


STRATEGIES = ("pagefusion", "fixed-fast", "advisor", "defaults", "naive")


def apply_strategy(name: str) -> Naive | None:
    ksm.write_value("advisor_mode", "none") if (ksm.SYSFS / "advisor_mode").exists() else None
    ksm.write_value("smart_scan", 1)
    if name == "pagefusion":
        services.start_daemon()
        return None
    if name in ("fixed-fast", "naive"):
        ksm.write_value("pages_to_scan", 5000)
        ksm.write_value("sleep_millisecs", 5)
    elif name == "advisor":
        ksm.write_value("pages_to_scan", 100)
        ksm.write_value("sleep_millisecs", 20)
        ksm.write_value("advisor_mode", "scan-time")
    elif name == "defaults":
        ksm.write_value("pages_to_scan", 100)
        ksm.write_value("sleep_millisecs", 20)
    ksm.write_value("run", ksm.RUN_MERGE)
    if name == "naive":
        naive = Naive()
        naive.thread.start()
        return naive
    return None


def stop_daemon_and_workers() -> None:
    services.stop_daemon()
    for record in runstate.all_records():
        supervision.stop(record.uuid)


def clear_ksm(strategy: str) -> None:
    """Unmerge everything. pagefusion's daemon and workers keep running, as on
    a host whose KSM state is cleared; the baselines run without them."""
    if strategy != "pagefusion":
        stop_daemon_and_workers()
    # Zero pages count apart (ksm_zero_pages), for every strategy alike.
    ksm.write_value("use_zero_pages", 1)
    # Writing 2 unmerges every page before the write returns.
    ksm.write_value("run", ksm.RUN_UNMERGE)
    testbed.eventually(lambda: fused_pages() == 0, 120.0, 0.5)
    if strategy != "pagefusion":
        ksm.write_value("run", ksm.RUN_STOP)


class PacingTrace:
    """The daemon's pacing decisions as they change, for the report."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, str, str]] = []
        self.began = time.monotonic()
        self.phase = "1"
        self.last: str | None = None

    def restart(self, phase: str) -> None:
        self.began, self.phase = time.monotonic(), phase

    def sample(self) -> None:
        decision = pacing.read_decision()
        if decision and decision["mode"] != self.last:
            self.last = decision["mode"]
            at = round(time.monotonic() - self.began, 1)
            self.changes.append((f"{self.phase}+{at}", decision["mode"], decision["reason"]))


class Sampler:
    """Samples fused memory, CPU and pacing every POLL_S in a thread of its
    own, so that nothing the benchmark does meanwhile (booting a guest,
    measuring the exact saving) hides when a target was reached."""

    def __init__(self, meter: CpuMeter, trace: PacingTrace) -> None:
        self.meter, self.trace = meter, trace
        self.series: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            self.series.append((time.monotonic() - self.started, fused_pages()))
            self.meter.sample()
            self.trace.sample()
            if self.stop.wait(POLL_S):
                return

    def time_to(self, target: int) -> float | None:
        """Seconds from the start until fused memory first reached ``target``."""
        for at, fused in self.series:
            if fused >= target:
                return round(at, 1)
        return None

    def wait_until(self, deadline: float) -> None:
        while time.monotonic() < deadline and not self.stop.is_set():
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


@dataclass
class Result:
    strategy: str
    achievable_pages: int
    t50_s: float | None
    t80_s: float | None
    phase1_cpu_s: float
    late_saving_pages: int
    late_boot_s: float
    late_t80_s: float | None
    phase2_cpu_s: float
    phase1_cpu_by_part: dict[str, float]
    phase2_cpu_by_part: dict[str, float]
    # pagefusion only: (seconds into the phase, mode, reason) at each change of mode
    pacing_trace: list[tuple[float, str, str]]


def run_strategy(name, factory, args) -> Result:
    if name == "pagefusion":
        services.start_daemon()
    clear_ksm(name)
    specs = [factory.spec(GROUP, **args.guest) for _ in range(args.guests)]
    for spec in specs:
        factory.define(spec).create()
    for spec in specs:
        guests.wait_until_booted(spec)
    time.sleep(args.settle_s)
    pids = [runstate.qemu_pid_of(spec.name) for spec in specs]
    achievable = fusible_truth.achievable_saving_pages(pids, include_zero=False)

    # Phase 1, cold.
    clear_ksm(name)
    meter = CpuMeter()
    meter.begin()
    trace = PacingTrace()
    with Sampler(meter, trace) as sampler:
        naive = apply_strategy(name)
        sampler.wait_until(sampler.started + args.window_s)
    t50 = sampler.time_to(achievable // 2)
    t80 = sampler.time_to(achievable * 8 // 10)
    phase1_parts = meter.by_part()
    fused_before = fused_pages()

    # Phase 2, late arrival.
    late = factory.spec(GROUP, **args.guest)
    meter.begin()
    trace.restart("2")
    with Sampler(meter, trace) as sampler:
        factory.define(late).create()
        late_boot_s = round(guests.wait_until_booted(late), 1)
        if name != "pagefusion":
            stop_daemon_and_workers()  # the hook started a worker; baselines run without
        pids.append(runstate.qemu_pid_of(late.name))
        late_saving = max(
            0, fusible_truth.achievable_saving_pages(pids, include_zero=False) - achievable
        )
        sampler.wait_until(sampler.started + args.late_window_s)
    late_t80 = sampler.time_to(fused_before + late_saving * 8 // 10)
    phase2_parts = meter.by_part()

    if naive:
        naive.stop.set()
    factory.cleanup()
    return Result(
        name, achievable, t50, t80, round(sum(phase1_parts.values()), 1), late_saving,
        late_boot_s, late_t80, round(sum(phase2_parts.values()), 1),
        {part: round(cpu, 2) for part, cpu in phase1_parts.items()},
        {part: round(cpu, 2) for part, cpu in phase2_parts.items()},
        trace.changes if name == "pagefusion" else [],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=4)
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--window-s", type=float, default=600.0, help="phase 1 window")
    parser.add_argument("--late-window-s", type=float, default=120.0, help="phase 2 window")
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.guest = {"memory_mib": args.memory_mib, "unique_mib": 32, "volatile_mib": 8}
    # Stopped with SIGTERM, still remove the guests and put KSM back.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    conn = testbed.ensure_libvirtd_with_hook()
    testbed.remove_leftover_guests(conn)
    factory = testbed.GuestFactory(conn, testbed.guestimage.ensure_image())
    results = []
    with testbed.ksm_settings_restored():
        try:
            for name in args.strategies.split(","):
                print(f"running {name} ...", file=sys.stderr, flush=True)
                results.append(run_strategy(name, factory, args))
                print(json.dumps(asdict(results[-1])), file=sys.stderr, flush=True)
        finally:
            factory.cleanup()
            stop_daemon_and_workers()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}")
    print(
        f"{args.guests} TCG guests of {args.memory_mib} MiB, phase 1 window {args.window_s:.0f} s,"
        f" phase 2 window {args.late_window_s:.0f} s"
    )
    header = (
        f"{'strategy':<11} {'achievable':>10} {'t50 s':>6} {'t80 s':>6} {'cpu1 s':>7}"
        f" {'late pages':>10} {'boot s':>6} {'late t80 s':>10} {'cpu2 s':>7}"
    )
    print(header)
    for r in results:
        print(
            f"{r.strategy:<11} {r.achievable_pages:>10} {r.t50_s!s:>6} {r.t80_s!s:>6}"
            f" {r.phase1_cpu_s:>7} {r.late_saving_pages:>10} {r.late_boot_s:>6}"
            f" {r.late_t80_s!s:>10}"
            f" {r.phase2_cpu_s:>7}"
        )
    print("CPU seconds by part (phase 1 / phase 2):")
    for r in results:
        parts = ", ".join(
            f"{part} {r.phase1_cpu_by_part[part]} / {r.phase2_cpu_by_part[part]}"
            for part in r.phase1_cpu_by_part
        )
        print(f"  {r.strategy:<11} {parts}")
    for r in results:
        for at, mode, reason in r.pacing_trace:
            print(f"  pacing at {at} s: {mode} ({reason})")
    by_name = {r.strategy: r for r in results}
    ours, fast, naive = (by_name.get(n) for n in ("pagefusion", "fixed-fast", "naive"))
    if ours and fast and naive and ours.t80_s and fast.t80_s:
        print(f"phase 1 t80, pagefusion / fixed-fast: {ours.t80_s / fast.t80_s:.2f} (target <= 1)")
        print(f"phase 1 CPU, pagefusion / naive: {ours.phase1_cpu_s / naive.phase1_cpu_s:.2f}"
              " (target <= 1)")  # fmt: skip
        total_ours = ours.phase1_cpu_s + ours.phase2_cpu_s
        total_naive = naive.phase1_cpu_s + naive.phase2_cpu_s
        print(f"whole window CPU, pagefusion / naive: {total_ours / total_naive:.2f} (target <= 2)")
        print(f"phase 2 t80, pagefusion: {ours.late_t80_s} s (target <= 15 s)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
