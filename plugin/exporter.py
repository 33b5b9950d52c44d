"""The daemon's Prometheus endpoint: every metric of the catalogue, fresh at each scrape.

Metric names follow Prometheus conventions (base units, ``_bytes``,
``_seconds_total``, ``_total``); domain metrics carry the labels ``domain``,
``uuid`` and ``group``. The endpoint listens on loopback unless the
configuration says otherwise: fingerprints never leave the host, but which
domains share memory is still worth keeping local.
"""

from __future__ import annotations

import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from pagefusion import metrics
from pagefusion.errors import HostError

log = logging.getLogger(__name__)

DOMAIN_LABELS = ("domain", "uuid", "group")


def _family(metric: metrics.Metric, labels: tuple[str, ...] = ()):
    name = metric.prometheus
    help_text = f"{metric.name}: {metric.meaning} ({metric.unit})."
    if metric.kind == "counter":
        # The client library appends _total itself.
        return CounterMetricFamily(name.removesuffix("_total"), help_text, labels=labels)
    return GaugeMetricFamily(name, help_text, labels=labels)


class PagefusionCollector(Collector):
    def collect(self):
        figures = metrics.collect()
        for metric in metrics.CATALOGUE:
            if metric.scope == "host":
                family = _family(metric)
                family.add_metric([], figures.values[metric.name])
            else:
                family = _family(metric, DOMAIN_LABELS)
                for domain in figures.domains:
                    labels = [domain.name, domain.uuid, domain.group or ""]
                    family.add_metric(labels, domain.values[metric.name])
            yield family


def registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PagefusionCollector())
    return registry


def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) to (host, port); None for ``off``."""
    if text.strip().lower() == "off":
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise HostError(f"metrics listen address {text!r} is not HOST:PORT or 'off'")
    return host, int(port)


def serve(listen: str):
    """Start the endpoint in a background thread; return the server (or None if off)."""
    from prometheus_client import start_http_server

    address = parse_listen(listen)
    if address is None:
        return None
    host, port = address
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry())
    except OSError as err:
        raise HostError(f"cannot serve metrics on {listen}: {err.strerror}") from None
    log.info("serving Prometheus metrics on http://%s/metrics", listen)
    return server
