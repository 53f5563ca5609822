"""The per-request half of the metrics: ``GatewayMetrics``, the observer that turns each finished request
into counter and histogram updates, with bounded labels. It owns the app's registry and binds the
scrape-time collector (collector.py) to it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry

from gateway.context import RequestContext
from gateway.metrics.collector import StateCollector, TelemetrySources
from gateway.metrics.fast import FastCounter, FastHistogram
from gateway.settings import GatewaySettings

# End-to-end latency and TTFT: tens of milliseconds (the 500 ms p99 objective sits on a bucket edge)
# up to the ten minutes a long generation may take.
LATENCY_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1)
LATENCY_BUCKETS += (1.5, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

OTHER = "other"
UNAUTHENTICATED = "unauthenticated"
NO_MODEL = "none"
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


class _Children(NamedTuple):
    """The labelled metric children of one (model, route, tenant)."""

    latency: Any
    overhead: Any
    ttft: Any
    itl: Any
    prompt_tokens: Any
    completion_tokens: Any


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
        self.requests = FastCounter(
            "llm_gateway_requests",
            "Requests by model, route, status class, decision and tenant",
            ["model", "route", "status_class", "decision", "tenant"],
            registry=r,
        )
        self.latency = FastHistogram(
            "llm_gateway_request_duration_seconds",
            "End-to-end request latency",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = FastHistogram(
            "llm_gateway_time_to_first_token_seconds",
            "Time to first token of streamed responses (first content chunk)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = FastHistogram(
            "llm_gateway_inter_token_latency_seconds",
            "Gap between streamed chunks",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.overhead = FastHistogram(
            "llm_gateway_overhead_seconds",
            "Time spent inside the gateway before forwarding",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = FastCounter(
            "llm_gateway_prompt_tokens", "Prompt tokens (from usage)", ["model", "tenant"], registry=r
        )
        self.completion_tokens = FastCounter(
            "llm_gateway_completion_tokens", "Completion tokens (from usage)", ["model", "tenant"], registry=r
        )
        self.upstream_errors = FastCounter(
            "llm_gateway_upstream_errors",
            "Upstream faults by kind (connect, timeout, http_5xx, stream_broken, stream_idle_timeout, broken, "
            "no_healthy_replica), counting every failed attempt, retried or not",
            ["model", "kind"],
            registry=r,
        )
        self._state_collector: StateCollector | None = None
        # Labelled children by label values (bounded): one dict lookup per request instead of .labels() calls.
        self._cache: dict[tuple[str, str, str], _Children] = {}
        self._requests_cache: dict[tuple[str, str, int, str, str], Any] = {}

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

    def _children(self, model: str, route: str, tenant: str) -> _Children:
        """The labelled children one (model, route, tenant) updates, looked up once (label values are
        bounded, so the cache is too)."""
        key = (model, route, tenant)
        c = self._cache.get(key)
        if c is None:
            c = self._cache[key] = _Children(
                self.latency.labels(model, route),
                self.overhead.labels(route),
                self.ttft.labels(model),
                self.itl.labels(model),
                self.prompt_tokens.labels(model, tenant),
                self.completion_tokens.labels(model, tenant),
            )
        return c

    def _requests_child(self, model: str, route: str, status: int, decision: str, tenant: str) -> Any:
        key = (model, route, status, decision, tenant)
        c = self._requests_cache.get(key)
        if c is None:
            sc = status_class(status)
            c = self._requests_cache[key] = self.requests.labels(model, route, sc, decision, tenant)
        return c

    async def on_request_end(self, ctx: RequestContext) -> None:
        model = self.model_label(ctx)
        tenant = self.tenant_label(ctx)
        c = self._children(model, ctx.route, tenant)
        self._requests_child(model, ctx.route, ctx.status, ctx.decision, tenant).inc()
        c.latency.observe(ctx.duration)
        if ctx.forwarded_at is not None:
            c.overhead.observe(ctx.forwarded_at - ctx.started)
        # TTFT only where it means something: a streamed response (a non-streamed one has only e2e latency).
        if ctx.stream and ctx.ttft is not None and ctx.status == 200:
            c.ttft.observe(ctx.ttft)
        if ctx.chunk_gaps:
            h = c.itl
            for g in ctx.chunk_gaps:
                h.observe(g)
        if ctx.prompt_tokens:
            c.prompt_tokens.inc(ctx.prompt_tokens)
        if ctx.completion_tokens:
            c.completion_tokens.inc(ctx.completion_tokens)
        for kind in ctx.upstream_errors:
            self.upstream_errors.labels(model, kind if kind in UPSTREAM_ERROR_KINDS else OTHER).inc()
