"""The extension points of the request path, with no-op defaults.

``create_app`` wires real implementations (quota, audit, metrics); the proxy only knows these protocols.
"""

from __future__ import annotations

from typing import Protocol

from gateway.context import RequestContext


class Ticket(Protocol):
    """What admission hands back: settled exactly once when the request ends (with real usage)."""

    async def settle(self, ctx: RequestContext) -> None: ...


class Admission(Protocol):
    """Quotas / overload protection. Raises ApiError(429/503) to refuse; may add ctx.response_headers."""

    async def admit(self, ctx: RequestContext) -> Ticket: ...


class Observer(Protocol):
    """Called exactly once per request after the response ended (audit, metrics)."""

    async def on_request_end(self, ctx: RequestContext) -> None: ...


class _NoTicket:
    async def settle(self, ctx: RequestContext) -> None:
        return None


NO_TICKET = _NoTicket()


class NoAdmissionControl:
    async def admit(self, ctx: RequestContext) -> Ticket:
        return NO_TICKET
