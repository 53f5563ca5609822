"""Quota metrics, registered on the app's own registry (``state.metrics.registry``). Labels are bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class QuotaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        # reason: requests | tokens | concurrency | request_too_large | backend_unavailable | queue_full | overloaded
        self.rejected = Counter("llm_gateway_quota_rejected", "Requests refused by admission, by reason", ["reason"], registry=r)
        # Requests decided without the shared backend; mode: open (local limits) | closed (503).
        self.backend_errors = Counter(
            "llm_gateway_quota_backend_errors", "Requests admitted or refused without the quota backend", ["backend", "mode"], registry=r
        )
        self.settle_errors = Counter(
            "llm_gateway_quota_settle_errors", "Settlements that could not reach the quota backend", ["backend"], registry=r
        )
        self.backend_up = Gauge("llm_gateway_quota_backend_up", "1 while the quota backend answers", ["backend"], registry=r)
        self.queue_depth = Gauge("llm_gateway_admission_queue_depth", "Requests waiting for an overloaded model", ["model"], registry=r)
        # outcome: admitted | timed_out
        self.queued = Counter("llm_gateway_admission_queued", "Requests that waited for an overloaded model", ["outcome"], registry=r)
