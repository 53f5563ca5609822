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
from typing import Any, ClassVar

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

    # The prometheus_client family type it is exported as (set by each subclass).
    family: ClassVar[type[Metric]] = Metric

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

    def _family(self) -> Any:
        return self.family(self.name, self.documentation, labels=self.labelnames)  # type: ignore[call-arg]

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _new(self) -> CounterChild | HistogramChild:
        raise NotImplementedError

    def _child(self, values: tuple[object, ...]) -> CounterChild | HistogramChild:
        """The child of these label values, made on first use; found again by the values as given (no
        str() per call) as well as by their text."""
        child = self._children.get(values)  # type: ignore[arg-type]
        if child is None:
            key = self._key(values)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new()
            self._children[values] = child  # type: ignore[index]
        return child

    def _series(self) -> list[tuple[tuple[str, ...], CounterChild | HistogramChild]]:
        """Each child once, with its label values as text (one C-level copy of the table first: safe
        against the event loop adding a child meanwhile)."""
        out, seen = [], set()
        for key, child in list(self._children.items()):
            if id(child) not in seen:
                seen.add(id(child))
                out.append((self._key(key), child))
        return out


class FastCounter(_Family):
    """A labelled counter (``<name>_total``), exported like ``prometheus_client.Counter``."""

    family: ClassVar[type[Metric]] = CounterMetricFamily

    def _new(self) -> CounterChild:
        return CounterChild()

    def labels(self, *values: object) -> CounterChild:
        return self._child(values)  # type: ignore[return-value]

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        for labels, child in self._series():
            assert isinstance(child, CounterChild)
            fam.add_metric(labels, child.value, created=child.created)
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

    family: ClassVar[type[Metric]] = HistogramMetricFamily

    def _new(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def labels(self, *values: object) -> HistogramChild:
        return self._child(values)  # type: ignore[return-value]

    def collect(self) -> Iterator[Metric]:
        fam = self._family()
        created: list[Sample] = []
        for labels, child in self._series():
            assert isinstance(child, HistogramChild)
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
