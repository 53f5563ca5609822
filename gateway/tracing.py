"""Optional OpenTelemetry tracing (off by default): one SERVER span per request.

W3C ``traceparent``/``tracestate`` from the client are the span's parent; the gateway's own span becomes
the parent of what the engine records, because the proxy forwards a ``traceparent`` naming it (start vLLM
with ``--otlp-traces-endpoint`` to export its spans). Spans go out over OTLP/HTTP from the SDK's batch
processor thread, never from the request path.

Disabled (the default), nothing here is imported or created: the proxy checks ``state.tracing is None``
once per forwarded request and the observer is not registered. Needs ``opentelemetry-sdk`` and
``opentelemetry-exporter-otlp-proto-http`` (the ``tracing`` extra) only when enabled.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.context import RequestContext

log = logging.getLogger("gateway.tracing")

_SPAN = "otel_span"


def _ns(wall_seconds: float) -> int:
    return int(wall_seconds * 1e9)


class RequestTracer:
    """Starts the request's span when it is forwarded, ends it (or makes it, for refusals) at the end."""

    def __init__(self, settings: Any) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._kind = SpanKind.SERVER
        self._status, self._code = Status, StatusCode
        self._set_span = set_span_in_context
        self._prop = TraceContextTextMapPropagator()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint) if settings.otlp_endpoint else OTLPSpanExporter()
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=int(settings.export_interval * 1000))
        )
        # A tracer of our own provider, not the process-global one.
        self.tracer = self.provider.get_tracer("llm-gateway")

    def on_request_start(self, ctx: RequestContext, headers: list[tuple[bytes, bytes]]) -> None:
        """Called by the proxy as a request arrives: the client's trace context is the span's parent."""
        carrier = {}
        for k, v in headers:
            if k == b"traceparent" or k == b"tracestate":
                carrier[k.decode()] = v.decode("latin-1")
        ctx.extra[_SPAN] = self.tracer.start_span(
            f"{ctx.method} {ctx.route}", context=self._prop.extract(carrier) if carrier else None, kind=self._kind,
            start_time=_ns(ctx.started_wall),
            attributes={"http.route": ctx.route, "llm.request_id": ctx.request_id},
        )

    def on_forward(self, ctx: RequestContext, up_headers: dict[str, str]) -> None:
        """Called by the proxy before the request goes upstream: the engine gets our span as its parent."""
        span = ctx.extra.get(_SPAN)
        if span is None:
            return
        up_headers.pop("traceparent", None)
        up_headers.pop("tracestate", None)
        self._prop.inject(up_headers, context=self._set_span(span))

    async def on_request_end(self, ctx: RequestContext) -> None:
        span = ctx.extra.pop(_SPAN, None)
        if span is None:
            return
        if not span.is_recording():
            span.end()
            return
        attrs: dict[str, Any] = {
            "http.response.status_code": ctx.status,
            "llm.decision": ctx.decision,
            "llm.stream": ctx.stream,
            "llm.attempts": ctx.attempts,
        }
        if ctx.model is not None and ctx.endpoint is not None:
            attrs["llm.model"] = ctx.model
            attrs["llm.endpoint"] = ctx.endpoint
        if ctx.principal is not None:
            attrs["llm.tenant"] = ctx.principal.tenant
        if ctx.prompt_tokens is not None:
            attrs["llm.usage.prompt_tokens"] = ctx.prompt_tokens
        if ctx.completion_tokens is not None:
            attrs["llm.usage.completion_tokens"] = ctx.completion_tokens
        if ctx.ttft is not None:
            attrs["llm.ttft_seconds"] = ctx.ttft
        span.set_attributes(attrs)
        if ctx.status >= 500:
            span.set_status(self._status(self._code.ERROR, ctx.reason or ctx.decision))
        end_wall = ctx.started_wall + ctx.duration
        span.end(end_time=_ns(end_wall))

    async def close(self) -> None:
        self.provider.shutdown()
