"""The per-request access log: one JSON line per request at INFO on the ``gateway.access`` logger.

Fields: request id, principal (API key id or token subject), tenant, method, route, model, status, decision,
replica, prompt/completion tokens, time to first token and duration (milliseconds). Never prompt or
completion text, never credentials. On by default; ``access_log: false`` (``GATEWAY_ACCESS_LOG=false``)
turns it off. The JSON shape comes from gateway/logs.py (every log line of the gateway is one JSON object).
"""

from __future__ import annotations

import logging

from gateway import logs
from gateway.context import RequestContext

log = logging.getLogger("gateway.access")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


class AccessLog:
    """Observer: logs each finished request once (batched per event-loop turn when the line goes straight
    to the gateway's own JSON handler, gateway/logs.py)."""

    def __init__(self) -> None:
        self.out = logs.BatchedLines(log)

    async def on_request_end(self, ctx: RequestContext) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        p = ctx.principal
        fields = {
            "request_id": ctx.request_id,
            "principal": (p.key_id or p.subject) if p is not None else None,
            "tenant": p.tenant if p is not None else None,
            "method": ctx.method,
            "route": ctx.route,
            "model": ctx.model,
            "status": ctx.status,
            "decision": ctx.decision,
            "replica": ctx.endpoint,
            "stream": ctx.stream,
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
            "ttft_ms": _ms(ctx.ttft),
            "duration_ms": _ms(ctx.duration),
        }
        if self.out.target() is not None:
            self.out.write_line("info", log.name, "request", fields)
        else:
            log.info("request", extra=fields)
