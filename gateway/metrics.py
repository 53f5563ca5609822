"""Prometheus metrics of the gateway, on a registry per app (never the global one). This module is the one
owner of every ``llm_gateway_*`` name: subsystems count in plain numbers and expose a typed snapshot.

Two halves:

* ``GatewayMetrics.on_request_end`` (an observer, once per request): request counts, latency / TTFT /
  inter-token / overhead histograms, token counters, upstream errors by kind.
* ``StateCollector`` (read at scrape time, nothing on the request path): the snapshots of routing (per
  replica health, load, breaker state, attempts and faults; retries per model), admission (quota and
  overload refusals, backend state, the overload wait queue), the audit writer (queue depth, records,
  write errors, back-pressure), and the in-flight count.

Every label value is bounded: models are the configured ones (anything else is ``"none"``), tenants come
from an allow-list or the first N seen (the rest fold into ``"other"``), routes, kinds and reasons are fixed
sets, endpoints are the configured or discovered replicas.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.context import RequestContext
from gateway.quota.metrics import QuotaMetrics
from gateway.routing.pool import EndpointPool
from gateway.routing.router import Router
from gateway.routing.telemetry import routing_snapshot
from gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from gateway.audit.writer import AuditSnapshot

log = logging.getLogger("gateway.metrics")

# End-to-end latency and TTFT: tens of milliseconds (the 500 ms p99 objective sits on a bucket edge)
# up to the ten minutes a long generation may take.
LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.35,
    0.5,
    0.75,
    1,
    1.5,
    2.5,
    5,
    10,
    20,
    30,
    60,
    120,
    300,
    600,
)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

OTHER = "other"
UNAUTHENTICATED = "unauthenticated"
NO_MODEL = "none"
BREAKER_STATES = ("closed", "open", "half_open")
# Kinds of upstream faults the proxy records in ctx.upstream_errors (anything else counts as "other").
UPSTREAM_ERROR_KINDS = frozenset(
    {"connect", "timeout", "http_5xx", "stream_broken", "stream_idle_timeout", "broken", "no_healthy_replica"}
)
_LABEL_OK = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def status_class(status: int) -> str:
    return f"{status // 100}xx" if status else "none"


class BoundedLabel:
    """Maps free-form values (tenants, reasons) onto a bounded set of label values.

    Values in ``allowed`` always keep their name. With ``dynamic`` > 0, the first ``dynamic`` other
    distinct values seen since start keep theirs too (a label, once given, is never taken back, so a
    series never changes meaning); everything after that is ``"other"``. ``reserved`` values (such as
    ``"unauthenticated"``) always pass.
    """

    def __init__(self, allowed: Iterable[str] = (), dynamic: int = 0, reserved: Iterable[str] = ()) -> None:
        self._known: set[str] = set(allowed) | set(reserved)
        self._dynamic_left = max(0, dynamic)

    def __call__(self, value: str | None) -> str:
        if value is None:
            return OTHER
        if value in self._known:
            return value
        if self._dynamic_left > 0 and _LABEL_OK.match(value):
            self._dynamic_left -= 1
            self._known.add(value)
            return value
        return OTHER

    @property
    def known(self) -> frozenset[str]:
        return frozenset(self._known)


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


class GatewayMetrics:
    """The observer that turns each finished request into metric updates, and the owner of the registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        models: Iterable[str] | None = None,
        tenants: Iterable[str] = (),
        tenant_top_n: int = 20,
        tenant_allow_list_only: bool = False,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        # None = accept any model name that reached an endpoint (the configured ones); else only these.
        self.models: frozenset[str] | None = frozenset(models) if models is not None else None
        self.tenant_label_of = BoundedLabel(
            tenants, 0 if tenant_allow_list_only else tenant_top_n, reserved=(UNAUTHENTICATED,)
        )
        r = self.registry
        self.requests = Counter(
            "llm_gateway_requests",
            "Requests by model, route, status class, decision and tenant",
            ["model", "route", "status_class", "decision", "tenant"],
            registry=r,
        )
        self.latency = Histogram(
            "llm_gateway_request_duration_seconds",
            "End-to-end request latency",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llm_gateway_time_to_first_token_seconds",
            "Time to first token of streamed responses (first content chunk)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llm_gateway_inter_token_latency_seconds",
            "Gap between streamed chunks",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "llm_gateway_overhead_seconds",
            "Time spent inside the gateway before forwarding",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llm_gateway_prompt_tokens", "Prompt tokens (from usage)", ["model", "tenant"], registry=r
        )
        self.completion_tokens = Counter(
            "llm_gateway_completion_tokens", "Completion tokens (from usage)", ["model", "tenant"], registry=r
        )
        self.upstream_errors = Counter(
            "llm_gateway_upstream_errors",
            "Upstream faults by kind (connect, timeout, http_5xx, stream_broken, stream_idle_timeout, broken, "
            "no_healthy_replica), counting every failed attempt, retried or not",
            ["model", "kind"],
            registry=r,
        )
        self._state_collector: StateCollector | None = None

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, registry: CollectorRegistry | None = None
    ) -> GatewayMetrics:
        """Models from the config; tenants from ``metrics.tenants`` or, if empty, from the API keys."""
        explicit = list(settings.metrics.tenants)
        tenants = explicit or [k.tenant for k in settings.api_keys]
        return cls(
            registry,
            models=[m.name for m in settings.models],
            tenants=tenants,
            tenant_top_n=settings.metrics.tenant_top_n,
            tenant_allow_list_only=bool(explicit),
        )

    def bind(self, sources: TelemetrySources) -> None:
        """Export the subsystems' snapshots (routing, admission, audit, in-flight) at scrape time."""
        if self._state_collector is None:
            self._state_collector = StateCollector(sources)
            self.registry.register(self._state_collector)
        else:
            self._state_collector.sources = sources

    # -- labels ---------------------------------------------------------------------------------------------

    def tenant_label(self, ctx: RequestContext) -> str:
        if ctx.principal is None:
            return UNAUTHENTICATED
        return self.tenant_label_of(ctx.principal.tenant)

    def model_label(self, ctx: RequestContext) -> str:
        m = ctx.model
        if m is None:
            return NO_MODEL
        if self.models is not None:
            return m if m in self.models else NO_MODEL
        # Without a model list, trust only names that were routed (client-supplied names are unbounded).
        return m if ctx.endpoint is not None else NO_MODEL

    # -- the observer ---------------------------------------------------------------------------------------

    async def on_request_end(self, ctx: RequestContext) -> None:
        model = self.model_label(ctx)
        tenant = self.tenant_label(ctx)
        self.requests.labels(model, ctx.route, status_class(ctx.status), ctx.decision, tenant).inc()
        self.latency.labels(model, ctx.route).observe(ctx.duration)
        if ctx.forwarded_at is not None:
            self.overhead.labels(ctx.route).observe(ctx.forwarded_at - ctx.started)
        # TTFT only where it means something: a streamed response (a non-streamed one has only e2e latency).
        if ctx.stream and ctx.ttft is not None and ctx.status == 200:
            self.ttft.labels(model).observe(ctx.ttft)
        if ctx.chunk_gaps:
            h = self.itl.labels(model)
            for g in ctx.chunk_gaps:
                h.observe(g)
        if ctx.prompt_tokens:
            self.prompt_tokens.labels(model, tenant).inc(ctx.prompt_tokens)
        if ctx.completion_tokens:
            self.completion_tokens.labels(model, tenant).inc(ctx.completion_tokens)
        for kind in ctx.upstream_errors:
            self.upstream_errors.labels(model, kind if kind in UPSTREAM_ERROR_KINDS else OTHER).inc()


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
