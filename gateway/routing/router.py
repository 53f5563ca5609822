"""The router: picks a replica for a request and learns from the outcome (passive health)."""

from __future__ import annotations

import logging

from gateway.context import RequestContext
from gateway.routing.pool import Endpoint, EndpointPool

log = logging.getLogger("gateway.routing")


class Router:
    """Least-outstanding choice among healthy replicas; an upstream fault marks a replica unhealthy
    until the next successful health probe. Client errors (4xx) never count as faults."""

    def pick(self, pool: EndpointPool, ctx: RequestContext, exclude: set[str] | frozenset[str] = frozenset()) -> Endpoint | None:
        return pool.pick(exclude)

    def on_success(self, pool: EndpointPool, ep: Endpoint, ctx: RequestContext) -> None:
        pool.mark_success(ep)

    def on_failure(self, pool: EndpointPool, ep: Endpoint, ctx: RequestContext, kind: str) -> None:
        log.warning("upstream fault on %s (%s)", ep.url, kind, extra={"request_id": ctx.request_id})
        pool.mark_failure(ep, kind)
