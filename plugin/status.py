"""``pagefusion status``: the pacing decision in force, its reason, and the workers."""

from __future__ import annotations

from pagefusion import daemon, ksm, pacing, supervision
from pagefusion.worker import read_report

KSM_SHOWN = ("run", "pages_to_scan", "sleep_millisecs", "pages_sharing", "ksm_zero_pages")


def collect() -> dict[str, object]:
    counters = ksm.counters()
    workers = []
    for record in pacing.running_page_fusion_records():
        report = read_report(record.uuid)
        workers.append(
            {
                "domain": record.name,
                "uuid": record.uuid,
                "group": record.page_fusion.effective_group,
                "worker_pid": supervision.worker_pid(record.uuid),
                "measured": bool(report and report.measured),
                "pages_total": report.pages_total if report else 0,
                "cycle": report.cycle if report else {},
                "cpu_seconds": round(report.cpu_seconds, 3) if report else 0.0,
            }
        )
    return {
        "daemon_pid": daemon.daemon_pid(),
        "pacing": pacing.read_decision(),
        "ksm": {name: counters.get(name) for name in KSM_SHOWN},
        "workers": workers,
    }


def render(report: dict[str, object]) -> str:
    lines = []
    decision = report["pacing"]
    if decision is None:
        lines.append("pacing: none yet (is 'pagefusion daemon' running?)")
    else:
        lines.append(f"pacing: {decision['mode']}: {decision['reason']}")
        lines.append(
            f"  fusible {decision['fusible_pages']} pages, fused {decision['fused_pages']},"
            f" backlog {decision['backlog_pages']}"
        )
    lines.append("KSM: " + ", ".join(f"{k}={v}" for k, v in report["ksm"].items()))
    for worker in report["workers"]:
        cycle = worker["cycle"]
        state = "measuring"
        if worker["measured"]:
            fusible, volatile = cycle.get("pages_fusible", 0), cycle.get("pages_volatile", 0)
            state = (
                f"fusible {fusible}, volatile {volatile}, zero {cycle.get('pages_zero', 0)}"
                f" of {worker['pages_total']} pages"
            )
        pid = worker["worker_pid"] or "none"
        lines.append(f"worker {pid} for {worker['domain']!r} ({worker['group']}): {state}")
    return "\n".join(lines)
