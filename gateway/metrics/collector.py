"""The scrape-time half of the metrics: ``StateCollector`` reads each subsystem's typed snapshot when
Prometheus scrapes (routing: ``routing_snapshot``; admission: ``QuotaMetrics.snapshot``; audit:
``AuditWriter.stats``) and names every series; nothing here runs on the request path."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.quota.metrics import QuotaMetrics
from gateway.routing.pool import EndpointPool
from gateway.routing.router import Router
from gateway.routing.telemetry import routing_snapshot

if TYPE_CHECKING:
    from gateway.audit.writer import AuditSnapshot

log = logging.getLogger("gateway.metrics")

BREAKER_STATES = ("closed", "open", "half_open")


class AuditStats(Protocol):
    """What the audit writer exposes to telemetry."""

    def stats(self) -> AuditSnapshot: ...


@dataclass
class TelemetrySources:
    """Where the scrape-time collector reads from. ``quota`` / ``audit`` are None when that part is off
    (then its metrics are absent, not zero)."""

    pools: Mapping[str, EndpointPool]
    router: Router | None = None
    quota: QuotaMetrics | None = None
    audit: AuditStats | None = None
    in_flight: Callable[[], int] = lambda: 0


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _filled(fam: Metric, values: Mapping[tuple[str, ...], float]) -> Metric:
    for lv, v in values.items():
        fam.add_metric(list(lv), v)  # type: ignore[attr-defined]
    return fam


class StateCollector(Collector):
    """Every scrape-time metric, from the subsystems' snapshots (never on the request path)."""

    def __init__(self, sources: TelemetrySources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return []  # families depend on what is wired; collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        src = self.sources
        in_flight = _gauge("llm_gateway_in_flight_requests", "Requests being handled now")
        in_flight.add_metric([], float(src.in_flight()))
        yield in_flight
        yield from self._routing(src)
        if src.quota is not None:
            yield from self._quota(src.quota)
        if src.audit is not None:
            try:
                audit = src.audit.stats()
            except Exception:  # a broken audit writer must not break the scrape
                log.exception("audit stats() failed")
            else:
                yield from self._audit(audit)

    @staticmethod
    def _routing(src: TelemetrySources) -> Iterator[Metric]:
        me = ("model", "endpoint")
        replicas = _gauge(
            "llm_gateway_replicas", "Replicas known to the pool (configured or discovered)", ["model"]
        )
        healthy = _gauge(
            "llm_gateway_replica_healthy", "1 if the replica passes its /health probes, else 0", me
        )
        available = _gauge(
            "llm_gateway_replica_available",
            "1 if the replica takes traffic now (healthy, breaker not open, not ejected)",
            me,
        )
        in_flight = _gauge(
            "llm_gateway_replica_in_flight", "Requests the gateway has open to the replica", me
        )
        waiting = _gauge(
            "llm_gateway_replica_engine_waiting",
            "Requests queued in the engine (vllm:num_requests_waiting)",
            me,
        )
        running = _gauge(
            "llm_gateway_replica_engine_running",
            "Requests running in the engine (vllm:num_requests_running)",
            me,
        )
        kv = _gauge(
            "llm_gateway_replica_kv_cache_usage_ratio",
            "Engine KV-cache use, 0..1 (vllm:kv_cache_usage_perc)",
            me,
        )
        breaker = _gauge(
            "llm_gateway_breaker_state",
            "Circuit breaker state per replica: 1 for the current state",
            [*me, "state"],
        )
        attempts = _counter("llm_gateway_replica_attempts", "Attempts the router sent to the replica", me)
        faults = _counter(
            "llm_gateway_replica_faults",
            "Upstream faults of the replica (connect, 5xx, timeout, broken stream)",
            me,
        )
        opened = _counter(
            "llm_gateway_breaker_opened", "Times the replica's circuit breaker opened (or re-opened)", me
        )
        ejections = _counter(
            "llm_gateway_outlier_ejections", "Times the replica was ejected as an outlier", me
        )
        retries = _counter(
            "llm_gateway_retries",
            "Retries on another replica (before any byte reached the client)",
            ["model"],
        )
        refused = _counter("llm_gateway_retries_refused", "Retries refused by the retry budget", ["model"])
        for pool in routing_snapshot(dict(src.pools), src.router):
            m = pool.model
            replicas.add_metric([m], len(pool.replicas))
            retries.add_metric([m], pool.retries)
            refused.add_metric([m], pool.retries_refused)
            for r in pool.replicas:
                lv = [m, r.url]
                healthy.add_metric(lv, 1.0 if r.healthy else 0.0)
                available.add_metric(lv, 1.0 if r.available else 0.0)
                in_flight.add_metric(lv, r.in_flight)
                waiting.add_metric(lv, r.engine_waiting)
                running.add_metric(lv, r.engine_running)
                kv.add_metric(lv, r.kv_cache_usage)
                for state in BREAKER_STATES:
                    breaker.add_metric([*lv, state], 1.0 if state == r.breaker_state else 0.0)
                attempts.add_metric(lv, r.attempts)
                faults.add_metric(lv, r.faults)
                opened.add_metric(lv, r.breaker_opened)
                ejections.add_metric(lv, r.ejections)
        yield from (replicas, healthy, available, in_flight, waiting, running, kv, breaker)
        yield from (attempts, faults, opened, ejections, retries, refused)

    @staticmethod
    def _quota(quota: QuotaMetrics) -> Iterator[Metric]:
        q = quota.snapshot()
        yield _filled(
            _counter(
                "llm_gateway_quota_rejected",
                "Requests refused by admission, by reason (requests, tokens, concurrency, request_too_large, "
                "backend_unavailable, queue_full, overloaded)",
                ["reason"],
            ),
            q.rejected,
        )
        yield _filled(
            _counter(
                "llm_gateway_quota_backend_errors",
                "Requests admitted or refused without the quota backend (mode: open = local limits, closed = 503)",
                ["backend", "mode"],
            ),
            q.backend_errors,
        )
        yield _filled(
            _counter(
                "llm_gateway_quota_settle_errors",
                "Settlements that could not reach the quota backend",
                ["backend"],
            ),
            q.settle_errors,
        )
        yield _filled(
            _gauge("llm_gateway_quota_backend_up", "1 while the quota backend answers", ["backend"]),
            q.backend_up,
        )
        yield _filled(
            _gauge(
                "llm_gateway_admission_queue_depth", "Requests waiting for an overloaded model", ["model"]
            ),
            q.queue_depth,
        )
        yield _filled(
            _counter(
                "llm_gateway_admission_queued",
                "Requests that waited for an overloaded model, by outcome",
                ["outcome"],
            ),
            q.queued,
        )

    @staticmethod
    def _audit(a: AuditSnapshot) -> Iterator[Metric]:
        depth = _gauge("llm_gateway_audit_queue_depth", "Audit records accepted but not yet written durably")
        depth.add_metric([], a.queue_depth)
        capacity = _gauge("llm_gateway_audit_queue_capacity", "Size of the audit queue (audit.queue_size)")
        capacity.add_metric([], a.queue_capacity)
        written = _counter("llm_gateway_audit_records_written", "Audit records written to the sink")
        written.add_metric([], a.records_written)
        errors = _counter(
            "llm_gateway_audit_write_errors", "Failed audit writes and fsyncs (retried; nothing dropped)"
        )
        errors.add_metric([], a.write_errors)
        held = _counter(
            "llm_gateway_audit_backpressure",
            "New requests held or refused (503) because the audit queue was full",
        )
        held.add_metric([], a.backpressure)
        yield from (depth, capacity, written, errors, held)
