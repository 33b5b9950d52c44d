"""The metrics are the kernel's own figures, in the CLI's JSON and on the Prometheus endpoint."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import testbed
from prometheus_client.parser import text_string_to_metric_families

from pagefusion import ksm, metrics, runstate
from pagefusion.element import PageFusion

pytestmark = pytest.mark.libvirt

ON = PageFusion(enabled=True, group="pftest")
ENDPOINT = "http://127.0.0.1:9177/metrics"


@pytest.fixture(scope="module")
def fusing(libvirt_conn, guest_image, pf_daemon_process):
    """Two page-fusion guests and one without, fused as far as KSM goes."""
    factory = testbed.GuestFactory(libvirt_conn, guest_image)
    specs = [factory.spec(ON), factory.spec(ON), factory.spec(PageFusion())]
    for spec in specs:
        factory.define(spec).create()
    for spec in specs:
        testbed.guests.wait_until_booted(spec)
    pids = [runstate.qemu_pid_of(spec.name) for spec in specs]
    assert testbed.eventually(
        lambda: all(ksm.process_stat(pid).merging_pages > 0 for pid in pids[:2]), 60.0, 0.5
    )
    yield specs
    factory.cleanup()


def kernel_figures(specs) -> tuple[int, dict[str, int]]:
    """RAM/VMM/Shared and each domain's Guest/RAM/Usage/Shared, read directly."""
    host = (ksm.read_value("pages_sharing") + ksm.read_value("ksm_zero_pages")) * 4096
    domains = {}
    for spec in specs:
        fields = {}
        pid = runstate.qemu_pid_of(spec.name)
        for line in open(f"/proc/{pid}/ksm_stat").read().splitlines():
            key, value = line.split(" ", 1)
            fields[key.rstrip(":")] = value
        pages = int(fields["ksm_merging_pages"]) + int(fields.get("ksm_zero_pages", 0))
        domains[spec.name] = pages * 4096
    return host, domains


def test_cli_json_equals_the_kernels_counters(fusing):
    # Compare while KSM is quiet; the bound below covers what it still does.
    testbed.eventually(lambda: ksm.shared_bytes() == (time.sleep(2) or ksm.shared_bytes()), 60)
    before = kernel_figures(fusing)
    done = testbed.cli("metrics", "query", "--json")
    after = kernel_figures(fusing)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)

    # Pages KSM merged or broke between our two reads are the only allowed
    # difference: the CLI's figure lies between them.
    low, high = sorted((before[0], after[0]))
    assert low <= shown["host"][metrics.HOST_SHARED] <= high
    by_name = {d["name"]: d for d in shown["domains"]}
    for spec in fusing:
        low, high = sorted((before[1][spec.name], after[1][spec.name]))
        assert low <= by_name[spec.name][metrics.GUEST_SHARED] <= high
    off = by_name[fusing[2].name]
    assert off["page_fusion"] == "off" and off[metrics.GUEST_SHARED] == 0
    assert by_name[fusing[0].name][metrics.GUEST_SHARED] > 0


def test_cli_samples_over_time(fusing):
    done = testbed.cli("metrics", "query", fusing[0].name, "--json", "--samples", "3",
                       "--period", "0.2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    samples = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(samples) == 3
    assert all([d["name"] for d in s["domains"]] == [fusing[0].name] for s in samples)
    assert samples[0]["time"] < samples[1]["time"] < samples[2]["time"]


def test_query_of_an_unknown_domain_is_one_line(fusing):
    done = testbed.cli("metrics", "query", "no-such-domain")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "'no-such-domain'" in done.stderr


def test_the_endpoint_serves_every_documented_metric_with_labels(fusing, running_daemon):
    text = testbed.eventually(lambda: _scrape(), 10.0, 0.2)
    assert text, "no answer from the metrics endpoint"
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)

    for metric in metrics.CATALOGUE:
        assert metric.prometheus in samples, metric.prometheus
        if metric.scope == "domain":
            labelled = {s.labels["domain"]: s.labels for s in samples[metric.prometheus]}
            for spec in fusing:
                assert spec.name in labelled
                assert set(labelled[spec.name]) == {"domain", "uuid", "group"}
    groups = {s.labels["domain"]: s.labels["group"]
              for s in samples["pagefusion_domain_shared_bytes"]}  # fmt: skip
    assert groups[fusing[0].name] == "pftest" and groups[fusing[2].name] == ""


def test_the_endpoint_listens_on_loopback_only(running_daemon):
    assert testbed.eventually(lambda: _scrape(), 10.0, 0.2)
    listening = [
        line.split()[1]
        for line in open("/proc/net/tcp").read().splitlines()[1:]
        if line.split()[3] == "0A"  # LISTEN
    ]
    port = f"{9177:04X}"
    ours = [address for address in listening if address.endswith(f":{port}")]
    assert ours == ["0100007F:" + port]


def _scrape() -> str | None:
    try:
        with urllib.request.urlopen(ENDPOINT, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None
