"""Prometheus metrics of the gateway, on a registry per app (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.context import RequestContext

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if status else "none"


class GatewayMetrics:
    """The observer that turns each finished request into metric updates."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_gateway_requests", "Requests by model, route, status class and decision",
            ["model", "route", "status_class", "decision", "tenant"], registry=r,
        )
        self.latency = Histogram(
            "llm_gateway_request_duration_seconds", "End-to-end request latency", ["model", "route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "llm_gateway_time_to_first_token_seconds", "Time to first token (first content chunk)", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "llm_gateway_inter_token_latency_seconds", "Gap between streamed chunks", ["model"],
            buckets=ITL_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "llm_gateway_overhead_seconds", "Time spent inside the gateway before forwarding", ["route"],
            buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("llm_gateway_prompt_tokens", "Prompt tokens (from usage)", ["model", "tenant"], registry=r)
        self.completion_tokens = Counter(
            "llm_gateway_completion_tokens", "Completion tokens (from usage)", ["model", "tenant"], registry=r
        )
        self.in_flight = Gauge("llm_gateway_in_flight_requests", "Requests being handled now", registry=r)

    def tenant_label(self, ctx: RequestContext) -> str:
        return ctx.principal.tenant if ctx.principal is not None else "unauthenticated"

    async def on_request_end(self, ctx: RequestContext) -> None:
        model = ctx.model if ctx.model is not None and ctx.endpoint is not None else "none"
        tenant = self.tenant_label(ctx)
        self.requests.labels(model, ctx.route, status_class(ctx.status), ctx.decision, tenant).inc()
        self.latency.labels(model, ctx.route).observe(ctx.duration)
        if ctx.forwarded_at is not None:
            self.overhead.labels(ctx.route).observe(ctx.forwarded_at - ctx.started)
        if ctx.ttft is not None and ctx.status == 200:
            self.ttft.labels(model).observe(ctx.ttft)
        if ctx.chunk_gaps:
            h = self.itl.labels(model)
            for g in ctx.chunk_gaps:
                h.observe(g)
        if ctx.prompt_tokens:
            self.prompt_tokens.labels(model, tenant).inc(ctx.prompt_tokens)
        if ctx.completion_tokens:
            self.completion_tokens.labels(model, tenant).inc(ctx.completion_tokens)
