"""Forwarding: the attempt loop (pick a replica -> send -> classify the verdict), retrying only before the
first byte went to the client.

Each attempt runs in two stages. Stage one sends the request and reads up to the first byte that could go
to the client (the whole body of a non-streamed answer, the first complete event of a stream), bounded by
the time-to-first-byte timeout. Any upstream fault there (refused or broken connection, 5xx, timeout) is
retried on another replica while the request has attempts left and the pool's retry budget has room: the
client has seen nothing yet. Stage two commits (``gateway/proxy/relay.py`` for streams): the response
starts, and from then on a fault ends the stream with an OpenAI-style error event instead (never a retry,
never a hang). The total timeout bounds both stages. Every attempt's verdict (ok, a fault kind, or none
when the client left) goes back to the router: breakers and outlier detection learn from it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.hooks import Router
from gateway.outcome import CLIENT_GONE
from gateway.proxy.relay import FAULT_OF, DrainFlag, StreamLimits, relay_stream
from gateway.proxy.request import ProxyRequest
from gateway.proxy.respond import Send, send_whole
from gateway.proxy.sse import has_complete_event, is_event_stream
from gateway.responses_api import ResponseIndex, ResponsesStream
from gateway.routing.pool import Endpoint, EndpointPool
from gateway.surface import remember_response
from gateway.upstream import (
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResponse,
    UpstreamSession,
)

Receive = Callable[[], Awaitable[Mapping[str, Any]]]


class Fault(StrEnum):
    """An upstream fault before the first byte reached the client (the router's fault kinds)."""

    CONNECT = "connect"
    HTTP_5XX = "5xx"
    TIMEOUT = "timeout"
    BROKEN = "broken"


class UpstreamFault(Exception):
    """An attempt failed on the upstream's side before anything reached the client (retryable)."""

    def __init__(self, kind: Fault, message: str, status: int = 0, body: bytes = b"") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.body = body

    @property
    def label(self) -> str:
        """The kind as counted in ``ctx.upstream_errors``."""
        return "http_5xx" if self.kind is Fault.HTTP_5XX else self.kind.value

    def api_error(self, model: str | None) -> ApiError:
        """The client's error when no attempt is left after this fault (and no engine answer to pass on)."""
        status, what, code = _GIVE_UP.get(self.kind, (502, f"failed: {self.message}", "upstream_error"))
        return ApiError(status, f"The model server for '{model}' {what}.", code=code, reason="upstream_error")


_GIVE_UP = {
    Fault.TIMEOUT: (504, "did not answer in time", "upstream_timeout"),
    Fault.CONNECT: (502, "is unreachable", "upstream_unreachable"),
}


@dataclass(slots=True, init=False)
class Forward:
    """One request's forwarding job: where it goes and what it may try."""

    ctx: RequestContext
    req: ProxyRequest
    # The upstream headers (the request's own, or a copy a tracer added its context to).
    headers: Mapping[str, str]
    pool: EndpointPool
    session: UpstreamSession
    router: Router
    drain: DrainFlag
    # Where stored Responses API objects live (recorded when the engine creates one).
    responses: ResponseIndex | None
    total_at: float | None
    last_fault: UpstreamFault | None

    # Written out (init=False): a generated __init__ would run as interpreted code in a compiled module.
    def __init__(
        self,
        ctx: RequestContext,
        req: ProxyRequest,
        headers: Mapping[str, str],
        pool: EndpointPool,
        session: UpstreamSession,
        router: Router,
        drain: DrainFlag,
        responses: ResponseIndex | None = None,
        total_at: float | None = None,
        last_fault: UpstreamFault | None = None,
    ) -> None:
        self.ctx = ctx
        self.req = req
        self.headers = headers
        self.pool = pool
        self.session = session
        self.router = router
        self.drain = drain
        self.responses = responses
        self.total_at = total_at
        self.last_fault = last_fault


async def _first_event(resp: UpstreamResponse) -> bytes:
    """Read until the stream holds one complete event; a stream that ends before that is broken."""
    buf = b""
    while not has_complete_event(buf):
        chunk = await resp.readany()
        if not chunk:
            raise UpstreamBrokenError("the stream ended before its first event")
        buf += chunk
    return buf


def _fault_of(error: BaseException, resp: UpstreamResponse | None, total_passed: bool) -> UpstreamFault:
    if isinstance(error, UpstreamFault):
        return error
    if isinstance(error, TimeoutError):
        why = "request ran past its total timeout" if total_passed else "replica did not answer in time"
        return UpstreamFault(Fault.TIMEOUT, why)
    name = type(error).__name__
    if resp is None and isinstance(error, UpstreamConnectError):
        return UpstreamFault(Fault.CONNECT, f"cannot reach replica ({name})")
    return UpstreamFault(Fault.BROKEN, f"replica broke the connection ({name})")


async def _open(job: Forward, url: str) -> tuple[UpstreamResponse, bytes, bool]:
    """Stage one: (response, body or first event(s), is a stream), or raises UpstreamFault.

    One deadline (the first-byte timeout, or the total when sooner) bounds every wait of this stage: the
    client enforces it with one timer (gateway/upstream.py)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + job.req.model.timeouts.first_byte_s
    if job.total_at is not None and job.total_at < deadline:
        deadline = job.total_at
    resp: UpstreamResponse | None = None
    try:
        req = job.req
        resp = await job.session.request(req.method, url, req.upstream_body, job.headers, deadline)
        job.ctx.ttfb = time.perf_counter() - job.ctx.started
        if resp.status >= 500:
            raise UpstreamFault(
                Fault.HTTP_5XX, f"replica answered {resp.status}", resp.status, await resp.read()
            )
        if is_event_stream(resp.status, resp.content_type):
            return resp, await _first_event(resp), True
        return resp, await resp.read(), False
    except (UpstreamFault, TimeoutError, UpstreamError, OSError) as e:
        if resp is not None:
            resp.close()
        total_passed = job.total_at is not None and loop.time() >= job.total_at
        raise _fault_of(e, resp, total_passed) from None
    except BaseException:
        if resp is not None:
            resp.close()
        raise


async def _give_up(job: Forward, fault: UpstreamFault, send: Send) -> None:
    """Out of attempts after ``fault``: pass the engine's own 5xx on (in OpenAI's shape), else an error."""
    if not fault.status:
        raise fault.api_error(job.ctx.model) from None
    await send_whole(job.ctx, fault.status, "application/json", fault.body, send)


def _verdict_to_router(job: Forward, ep: Endpoint, verdict: str | None) -> None:
    if verdict is None:
        job.router.on_abandon(job.pool, ep, job.ctx)
    elif verdict == "ok":
        job.router.on_success(job.pool, ep, job.ctx)
    else:
        job.router.on_failure(job.pool, ep, job.ctx, verdict)


async def _attempt(job: Forward, ep: Endpoint, send: Send) -> bool:
    """One attempt on ``ep``. True: the request is answered; False: retry on another replica."""
    ctx = job.ctx
    ep.in_flight += 1
    verdict: str | None = None  # None: no verdict (the client left); "ok"; or an upstream fault kind
    resp: UpstreamResponse | None = None
    try:
        try:
            resp, first, streamed = await _open(job, ep.url + job.req.upstream_path)
        except UpstreamFault as f:
            verdict = f.kind.value
            job.last_fault = f
            ctx.error_message = f.message
            ctx.upstream_errors.append(f.label)
            if job.router.may_retry(job.pool, ctx):
                return False
            await _give_up(job, f, send)
            return True
        verdict = "ok"
        if streamed:
            limits = StreamLimits(job.req.model.timeouts.idle_s, job.total_at, job.drain)
            route = job.req.route
            typed = ResponsesStream() if route.usage == "responses" else None

            def on_response_id(rid: str) -> None:
                remember_response(route, ctx, job.responses, rid)

            end = await relay_stream(ctx, resp, first, send, limits, typed, on_response_id)
            verdict = FAULT_OF.get(end, "ok") if end is not None else "ok"
        else:
            ctype = resp.content_type
            route = job.req.route
            await send_whole(
                ctx, resp.status, ctype, first, send, route.response_transform, route, job.responses
            )
        return True
    finally:
        ep.in_flight -= 1
        if resp is not None:
            # Fully read responses already went back to the pool; anything else (a client that left
            # mid-stream) closes the connection, which makes vLLM abort the request.
            resp.close()
        _verdict_to_router(job, ep, verdict)


def _no_replica(job: Forward, tried: set[str]) -> ApiError:
    ctx = job.ctx
    if tried:
        if job.last_fault is not None and job.last_fault.kind is Fault.TIMEOUT:
            # Every replica tried timed out: that is a gateway timeout, not a bad gateway.
            return job.last_fault.api_error(ctx.model)
        return ApiError(
            502,
            f"All replicas of '{ctx.model}' failed: {ctx.error_message}",
            code="upstream_unavailable",
            reason="upstream_error",
        )
    ctx.upstream_errors.append("no_healthy_replica")
    return ApiError(
        503,
        f"No healthy replica is serving '{ctx.model}' right now; retry shortly.",
        code="no_healthy_upstream",
        headers={"retry-after": "2"},
        reason="upstream_error",
    )


async def _attempts(job: Forward, send: Send) -> None:
    tried: set[str] = set()
    pinned = job.req.pinned_endpoint
    while True:
        if pinned is not None:
            # A stored response lives on one replica: that one or none (never retried elsewhere).
            ep = next((e for e in job.pool.endpoints if e.url == pinned and e.url not in tried), None)
            if ep is None and not tried:
                raise ApiError(
                    404,
                    "The replica that stored this response is gone.",
                    param=job.req.route.affinity_param,
                    code="response_not_found",
                )
        else:
            ep = job.router.pick(job.pool, job.ctx, exclude=tried)
        if ep is None:
            raise _no_replica(job, tried)
        tried.add(ep.url)
        job.ctx.endpoint = ep.url
        job.ctx.attempts += 1
        if job.ctx.forwarded_at is None:
            job.ctx.forwarded_at = time.perf_counter()
        if await _attempt(job, ep, send):
            return


class DisconnectHook(Protocol):
    """The server's connection, when it can say that the client left (gateway/http_server.py)."""

    def on_lost(self, callback: Callable[[asyncio.Task[None] | None], None] | None) -> None: ...


def _client_left(ctx: RequestContext, task: asyncio.Task[Any] | None) -> None:
    ctx.client_gone = True
    ctx.end(CLIENT_GONE)
    if task is not None and not task.done():
        task.cancel()


async def _watch_disconnect(receive: Receive, ctx: RequestContext, task: asyncio.Task[Any] | None) -> None:
    """Wait for the client to go away; then cancel the forwarding task so the upstream request is closed."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            _client_left(ctx, task)
            return


async def forward(
    job: Forward, receive: Receive, send: Send, connection: DisconnectHook | None = None
) -> None:
    """Route and forward one admitted request; the client's disconnect cancels it (and the upstream call).

    With our HTTP protocol's ``connection`` the disconnect arrives as a callback (no task per request);
    under any other server a task waits on ``receive()`` for it."""
    total = job.req.model.timeouts.total
    job.total_at = asyncio.get_running_loop().time() + total if total else None
    if connection is not None:
        # The server hands over the task answering the request (no current_task() lookup per request).
        ctx = job.ctx
        connection.on_lost(lambda task: _client_left(ctx, task))
        try:
            await _attempts(job, send)
        finally:
            connection.on_lost(None)
        return
    watcher = asyncio.ensure_future(_watch_disconnect(receive, job.ctx, asyncio.current_task()))
    try:
        await _attempts(job, send)
    finally:
        watcher.cancel()
