"""The gateway's shared objects, typed: built once by ``create_app`` and handed to every endpoint."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.hooks import Admission, Authenticator, Observer, Router, Tracer
from gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from gateway.audit.writer import AuditWriter
    from gateway.metrics import GatewayMetrics
    from gateway.responses_api import ResponseIndex
    from gateway.routing.discovery import DnsDiscovery
    from gateway.routing.pool import EndpointPool, HealthChecker
    from gateway.upstream import UpstreamSession

Closer = Callable[[], Awaitable[None]]


@dataclass(eq=False)
class GatewayState:
    """Shared objects of one app (one per worker process), created in ``create_app`` and its lifespan."""

    settings: GatewaySettings
    auth: Authenticator
    pools: dict[str, EndpointPool]
    router: Router
    # The admission chain (gateway/admission.py).
    admission: Admission
    metrics: GatewayMetrics
    # Called once per request after it ended: metrics, then audit and tracing when enabled.
    observers: list[Observer] = field(default_factory=list)
    # One upstream client per model pool (gateway/upstream.py), opened in the lifespan.
    sessions: dict[str, UpstreamSession] = field(default_factory=dict)
    health: HealthChecker | None = None
    discovery: DnsDiscovery | None = None
    # The audit writer when audit is enabled (queue_depth() for metrics).
    audit: AuditWriter | None = None
    # The request tracer when tracing is enabled (off by default).
    tracing: Tracer | None = None
    # Run at shutdown, in order, after in-flight requests ended.
    closers: list[Closer] = field(default_factory=list)
    in_flight: int = 0
    # True when an admission step may hold a request for a while (the fair queue): the endpoint then watches
    # for the client leaving while it waits.
    admission_waits: bool = False
    # Set on SIGTERM: /readyz answers 503 and new proxied requests get 503 (gateway/drain.py).
    draining: bool = False
    # Set when the drain deadline passed: streams still running end with an error event.
    drain_expired: bool = False
    started: float = field(default_factory=time.time)
    # Where stored Responses API objects live (GET/cancel by id go to that replica, for their creator).
    responses: ResponseIndex | None = None
