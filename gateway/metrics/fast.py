"""Labelled counters and histograms for the per-request metrics, updated without a lock.

Every request's end updates several series (requests, latency, overhead, tokens; TTFT and inter-token gaps
for streams). ``prometheus_client``'s children take a ``threading.Lock`` per update and walk the bucket list
in Python; these are updated only from the event loop's thread (the observer runs there), so a plain add
is enough, and a histogram finds its bucket with ``bisect``. They are exported through the same registry, in
the same text as ``prometheus_client.Counter`` / ``Histogram`` (``_total`` / ``_bucket``, ``_count``,
``_sum`` and the ``_created`` series), so dashboards and alerts see no difference. A scrape from another
thread reads a consistent-enough snapshot (each number is read atomically under the GIL).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class CounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ends with +Inf
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (Prometheus' "le").
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family(Collector):
    """One metric name with labels; children are made on first use and kept (label values are bounded)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry | None
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], CounterChild | HistogramChild] = {}
        if registry is not None:
            registry.register(self)

    def _key(self, values: tuple[object, ...]) -> tuple[str, ...]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(values)}")
        return tuple(str(v) for v in values)

    def _items(self) -> list[tuple[tuple[str, ...], CounterChild | HistogramChild]]:
        return list(self._children.items())  # one C-level copy: safe against the loop adding a child


class FastCounter(_Family):
    """A labelled counter (``<name>_total``), exported like ``prometheus_client.Counter``."""

    def labels(self, *values: object) -> CounterChild:
        child = self._children.get(values)  # type: ignore[arg-type]
        if child is None:
            key = self._key(values)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = CounterChild()
            self._children[values] = child  # type: ignore[index]
        return child  # type: ignore[return-value]

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        seen: set[int] = set()
        for key, child in self._items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            assert isinstance(child, CounterChild)
            fam.add_metric(self._key(key), child.value, created=child.created)
        yield fam


class FastHistogram(_Family):
    """A labelled histogram, exported like ``prometheus_client.Histogram``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._le = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: object) -> HistogramChild:
        child = self._children.get(values)  # type: ignore[arg-type]
        if child is None:
            key = self._key(values)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = HistogramChild(self.bounds)
            self._children[values] = child  # type: ignore[index]
        return child  # type: ignore[return-value]

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created: list[Sample] = []
        seen: set[int] = set()
        for key, child in self._items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            assert isinstance(child, HistogramChild)
            labels = self._key(key)
            counts = list(child.counts)
            buckets, total = [], 0
            for le, n in zip(self._le, counts, strict=True):
                total += n
                buckets.append((le, float(total)))
            fam.add_metric(labels, buckets, child.sum)
            created.append(
                Sample(self.name + "_created", dict(zip(self.labelnames, labels, strict=True)), child.created)
            )
        fam.samples.extend(created)
        yield fam
