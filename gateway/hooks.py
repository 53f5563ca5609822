"""The declared seams of the request path, and their no-op defaults.

``create_app`` wires real implementations; the proxy (``gateway/proxy/``) knows only these protocols:

- ``Authenticator``: credentials in the request headers -> ``Principal``; may this principal use a model?
- ``AdmissionStep``: one link of the admission chain (``gateway/admission.py``); ``Admission`` is the whole
  chain as the proxy sees it.
- ``Router``: picks a replica for an attempt and learns from the attempt's verdict.
- ``Observer``: called exactly once per request after the response ended (metrics, audit, tracing);
  ``Tracer``: the two extra moments tracing needs (request start, just before forwarding).
- ``AuditSink``: where sealed audit records go (file, stdout, a network sink); writes are awaited.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from gateway.auth.principal import Principal
from gateway.context import RequestContext

if TYPE_CHECKING:
    from gateway.routing.pool import Endpoint, EndpointPool

Headers = list[tuple[bytes, bytes]]


class Authenticator(Protocol):
    """Raises ApiError(401) for missing/invalid credentials, ApiError(403) from ``authorize``."""

    async def authenticate(self, headers: Headers) -> Principal: ...

    def authorize(self, principal: Principal, model: str) -> None: ...


class Ticket(Protocol):
    """What an admission step hands back: settled exactly once when the request ends (with real usage)."""

    async def settle(self, ctx: RequestContext) -> None: ...


class AdmissionStep(Protocol):
    """One step of the admission chain. ``admit`` refuses by raising ApiError (4xx/5xx), passes by returning
    None, or holds something for the request's lifetime (a token reservation, a concurrency slot, a place
    in a fair queue) by returning a Ticket that is settled when the request ends. A step may wait (the
    overload wait does); if a later step refuses or the client leaves while it waits, the chain settles
    the tickets earlier steps returned. Steps may add ``ctx.response_headers``."""

    name: str

    async def admit(self, ctx: RequestContext) -> Ticket | None: ...


class Admission(Protocol):
    """The whole admission decision for one request (the chain): one Ticket that settles everything held."""

    async def admit(self, ctx: RequestContext) -> Ticket: ...


class Router(Protocol):
    """Replica choice and passive health. ``pick`` returns None when no replica may take the attempt."""

    def pick(
        self, pool: EndpointPool, ctx: RequestContext, exclude: set[str] | frozenset[str] = ...
    ) -> Endpoint | None: ...

    def may_retry(self, pool: EndpointPool, ctx: RequestContext) -> bool: ...

    def on_success(self, pool: EndpointPool, ep: Endpoint, ctx: RequestContext) -> None: ...

    def on_abandon(self, pool: EndpointPool, ep: Endpoint, ctx: RequestContext) -> None: ...

    def on_failure(self, pool: EndpointPool, ep: Endpoint, ctx: RequestContext, kind: str) -> None: ...


class Observer(Protocol):
    """Called exactly once per request after the response ended (audit, metrics, tracing)."""

    async def on_request_end(self, ctx: RequestContext) -> None: ...


class Tracer(Observer, Protocol):
    """An observer that also sees the request arrive and the moment it is forwarded (to inject context)."""

    def on_request_start(self, ctx: RequestContext, headers: Headers) -> None: ...

    def on_forward(self, ctx: RequestContext, up_headers: dict[str, str]) -> None: ...


class AuditSink(Protocol):
    """Where the audit writer puts records (``gateway/audit/sink.py``: file, stdout; chosen by ``audit.sink``).
    ``write`` is awaited by the writer task, so a network sink never blocks the event loop; ``sync`` makes
    what was written durable (fsync for a file)."""

    # Called with each closed segment file (to archive it); a sink without segment files never calls it.
    on_closed: Callable[[str], None] | None

    async def open(self) -> None:
        """Start (or continue, after a restart) the hash chain; called once before the first write."""

    async def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Seal and write records, in order. Raises OSError on failure (the writer keeps them and retries)."""

    async def sync(self) -> None:
        """Make everything written so far durable."""

    def rotate_due_in(self) -> float | None:
        """Seconds until a time-based rotation is due (None: never)."""

    async def maybe_rotate(self) -> None:
        """Rotate when a size or age limit is reached."""

    def closed_segments(self) -> list[str]:
        """Closed segment files left from earlier runs, not yet archived (oldest first)."""

    async def close(self) -> None:
        """At shutdown, after the last write: close the chain's current segment."""


class _NoTicket:
    async def settle(self, ctx: RequestContext) -> None:
        return None


NO_TICKET: Ticket = _NoTicket()


class NoAdmissionControl:
    """An admission that admits everything (kept for callers that wrap one)."""

    async def admit(self, ctx: RequestContext) -> Ticket:
        return NO_TICKET
