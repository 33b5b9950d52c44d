"""``pagefusion metrics list|query``: the catalogue and the figures, as tables or JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from pagefusion import metrics

MIB = 2**20


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_catalogue() -> str:
    rows = [("metric", "scope", "unit", "prometheus", "source")]
    rows += [(m.name, m.scope, m.unit, m.prometheus, m.source) for m in metrics.CATALOGUE]
    return _table(rows)


def catalogue_json() -> list[dict[str, str]]:
    return [
        {
            "name": m.name,
            "scope": m.scope,
            "unit": m.unit,
            "prometheus": m.prometheus,
            "kind": m.kind,
            "source": m.source,
            "meaning": m.meaning,
        }
        for m in metrics.CATALOGUE
    ]


def _shown(metric: metrics.Metric, value: float) -> str:
    if metric.unit == "bytes":
        return f"{value / MIB:.1f} MiB"
    if metric.unit == "seconds":
        return f"{value:.2f} s"
    return f"{value:g}"


def render(figures: metrics.HostMetrics) -> str:
    domain_metrics = [m for m in metrics.CATALOGUE if m.scope == "domain"]
    rows = [("domain", "group", *(m.name for m in domain_metrics))]
    for d in figures.domains:
        cells = [_shown(m, d.values[m.name]) for m in domain_metrics]
        rows.append((d.name, d.group or "-", *cells))
    host = [
        f"{m.name}: {_shown(m, figures.values[m.name])}"
        for m in metrics.CATALOGUE
        if m.scope == "host"
    ]
    parts = [_table(rows)] if figures.domains else ["no running domain"]
    return "\n".join(parts + host)


def query(
    names: list[str],
    *,
    as_json: bool,
    samples: int,
    period_s: float,
    emit: Callable[[str], None] = print,
) -> None:
    """Print ``samples`` readings ``period_s`` apart (JSON: one object per line)."""
    for index in range(samples):
        if index:
            time.sleep(period_s)
        figures = metrics.collect(names or None)
        if as_json:
            emit(json.dumps({"time": time.time(), **figures.as_dict()}, sort_keys=True))
        else:
            if samples > 1:
                emit(time.strftime("%H:%M:%S"))
            emit(render(figures))
