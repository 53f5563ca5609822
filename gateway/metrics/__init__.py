"""Prometheus metrics of the gateway, on a registry per app (never the global one). This package is the one
owner of every ``llm_gateway_*`` name: subsystems count in plain numbers and expose a typed snapshot.

Two halves:

* ``GatewayMetrics.on_request_end`` (observer.py, an observer, once per request): request counts, latency /
  TTFT / inter-token / overhead histograms, token counters, upstream errors by kind.
* ``StateCollector`` (collector.py, read at scrape time, nothing on the request path): the snapshots of
  routing (per replica health, load, breaker state, attempts and faults; retries per model), admission
  (quota and overload refusals, backend state, the overload wait queue), the audit writer (queue depth,
  records, write errors, back-pressure), and the in-flight count.

Every label value is bounded: models are the configured ones (anything else is ``"none"``), tenants come
from an allow-list or the first N seen (the rest fold into ``"other"``), routes, kinds and reasons are fixed
sets, endpoints are the configured or discovered replicas.
"""

from gateway.metrics.collector import AuditStats, StateCollector, TelemetrySources
from gateway.metrics.observer import (
    LATENCY_BUCKETS,
    NO_MODEL,
    OTHER,
    UNAUTHENTICATED,
    UPSTREAM_ERROR_KINDS,
    BoundedLabel,
    GatewayMetrics,
    status_class,
)

__all__ = [
    "LATENCY_BUCKETS",
    "NO_MODEL",
    "OTHER",
    "UNAUTHENTICATED",
    "UPSTREAM_ERROR_KINDS",
    "AuditStats",
    "BoundedLabel",
    "GatewayMetrics",
    "StateCollector",
    "TelemetrySources",
    "status_class",
]
