"""Fair-queue metrics, bounded: models and classes are configured sets; tenants are the configured ones
plus the first 20 others seen (the rest fold into "other").

- ``llm_gateway_fair_queue_depth{model,class,tenant}`` (scrape time): requests waiting for a slot.
- ``llm_gateway_fair_slots{model}`` / ``llm_gateway_fair_slots_in_use{model}`` (scrape time).
- ``llm_gateway_fair_slot_hold_seconds{model}`` (scrape time): mean slot hold, the basis of the prediction.
- ``llm_gateway_fair_queue_wait_seconds{model,class,tenant}``: time from admission to a slot.
- ``llm_gateway_fair_shed_total{model,class,tenant,reason}``: requests refused with 503 (queue_full,
  predicted_wait, wait_timeout).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.fairqueue.config import FairQueueSettings
from gateway.metrics import BoundedLabel

if TYPE_CHECKING:
    from gateway.fairqueue.admission import FairQueueStep

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class FairQueueMetrics(Collector):
    def __init__(
        self, step: FairQueueStep, registry: CollectorRegistry | None, settings: FairQueueSettings
    ) -> None:
        self.step = step
        self.tenant = BoundedLabel(list(settings.tenants), 20)
        self.enabled = registry is not None
        if registry is None:
            return
        self.wait = Histogram(
            "llm_gateway_fair_queue_wait_seconds",
            "Time a request waited in the gateway's fair queue for a slot",
            ["model", "class", "tenant"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.shed_total = Counter(
            "llm_gateway_fair_shed",
            "Requests refused by the fair queue with 503 (queue_full, predicted_wait, wait_timeout)",
            ["model", "class", "tenant", "reason"],
            registry=registry,
        )
        registry.register(self)

    def observe_wait(self, model: str, cls: str, tenant: str, seconds: float) -> None:
        if self.enabled:
            self.wait.labels(model, cls, self.tenant(tenant)).observe(seconds)

    def shed(self, model: str, cls: str, tenant: str, reason: str) -> None:
        if self.enabled:
            self.shed_total.labels(model, cls, self.tenant(tenant), reason).inc()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "llm_gateway_fair_queue_depth", "Requests waiting for a slot", labels=["model", "class", "tenant"]
        )
        slots = GaugeMetricFamily(
            "llm_gateway_fair_slots", "Slots (sequences in flight) the model may use", labels=["model"]
        )
        in_use = GaugeMetricFamily("llm_gateway_fair_slots_in_use", "Slots in use", labels=["model"])
        hold = GaugeMetricFamily(
            "llm_gateway_fair_slot_hold_seconds",
            "Mean time a slot is held (moving average)",
            labels=["model"],
        )
        for model, q in self.step.queues.items():
            slots.add_metric([model], q.capacity)
            in_use.add_metric([model], q.in_use)
            hold.add_metric([model], q.mean_hold or 0.0)
            sums: dict[tuple[str, str], int] = {}
            for (cls, tenant), n in q.queued_by().items():
                key = (cls, self.tenant(tenant))
                sums[key] = sums.get(key, 0) + n
            for (cls, tenant), n in sums.items():
                depth.add_metric([model, cls, tenant], n)
        yield from (depth, slots, in_use, hold)
