"""The metric catalogue follows VirtualBox's and Prometheus' naming."""

from __future__ import annotations

import pytest

from pagefusion import exporter, metrics
from pagefusion.errors import HostError


def test_virtualbox_metrics_are_there():
    assert metrics.BY_NAME["RAM/VMM/Shared"].scope == "host"
    assert metrics.BY_NAME["Guest/RAM/Usage/Shared"].scope == "domain"


@pytest.mark.parametrize("metric", metrics.CATALOGUE, ids=lambda m: m.name)
def test_prometheus_names_carry_base_units(metric):
    assert metric.prometheus.startswith("pagefusion_")
    if metric.unit == "bytes":
        assert metric.prometheus.endswith("_bytes")
    if metric.kind == "counter":
        assert metric.prometheus.endswith("_total")
    if metric.unit == "seconds":
        assert metric.prometheus.endswith("_seconds_total")
    assert metric.source and metric.meaning


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:9177", ("127.0.0.1", 9177)), ("[::1]:80", ("::1", 80)), ("off", None)],
)
def test_listen_addresses(text, address):
    assert exporter.parse_listen(text) == address


@pytest.mark.parametrize("text", ["9177", "host:", ":9177", "host:99999", "host:port"])
def test_bad_listen_addresses_say_what_is_expected(text):
    with pytest.raises(HostError, match="HOST:PORT"):
        exporter.parse_listen(text)
