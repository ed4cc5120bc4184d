"""Just enough of the Prometheus text format to diff the gateway's counters around a run."""

from __future__ import annotations

import re
from collections.abc import Mapping

Sample = tuple[str, frozenset[tuple[str, str]]]
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[Sample, float]:
    """Every sample line as ``(name, labels) -> value``; comments and junk are skipped."""
    out: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = value
    return out


def diff(
    before: Mapping[Sample, float], after: Mapping[Sample, float], name: str
) -> list[tuple[dict[str, str], float]]:
    """Increase of each series of counter ``name`` between two scrapes (new series count fully)."""
    rows = []
    for (metric, labels), value in after.items():
        if metric != name:
            continue
        delta = value - before.get((metric, labels), 0.0)
        if delta:
            rows.append((dict(labels), delta))
    return rows


def gauge(samples: Mapping[Sample, float], name: str, label: str) -> dict[str, float]:
    """Values of gauge ``name`` keyed by one of its labels."""
    return {
        dict(labels).get(label, ""): value
        for (metric, labels), value in samples.items()
        if metric == name
    }


def total(samples: Mapping[Sample, float], name: str) -> float:
    """Sum of every series of ``name``."""
    return sum(v for (metric, _), v in samples.items() if metric == name)
