"""The ingress's /metrics: every replica's Prometheus exposition merged into one, per-replica labelled.

Each replica exports its engine's `pagoda:` metrics labelled with `model_name` (engine/metrics.py) and
ships the text in its `ReplicaReport`. Concatenating the texts would repeat each family's `# TYPE`
line, which Prometheus rejects, so the families are parsed, given a `replica` label and re-rendered
together: one family per metric name, a series per (model_name, replica, ...).
"""
from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class _Families:
    """A registry-shaped holder: `generate_latest` only calls `collect()`."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_expositions(parts: list[tuple[dict[str, str], bytes]]) -> bytes:
    """Merges Prometheus text expositions, adding each part's extra labels to all its series."""
    merged: dict[str, Metric] = {}
    for extra_labels, text in parts:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            for sample in family.samples:
                target.samples.append(Sample(sample.name, {**sample.labels, **extra_labels}, sample.value,
                                             sample.timestamp, sample.exemplar))
    return generate_latest(_Families(merged.values()))  # type: ignore[arg-type]
