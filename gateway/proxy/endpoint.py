"""The proxied OpenAI routes: one plain ASGI endpoint per route, reading as the request path.

parse -> authenticate -> admit (authorize, size, quota, overload: the admission chain) -> route+forward ->
settle -> observe. Each step lives in its own module; this one only orders them and makes sure that the
quota ticket is settled and the observers are called exactly once, whatever happened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from gateway.context import RequestContext, new_request_id
from gateway.errors import ApiError
from gateway.hooks import NO_TICKET, Headers, Observer, Ticket
from gateway.http_server import CONNECTION_KEY
from gateway.outcome import CLIENT_GONE
from gateway.proxy.forward import DisconnectHook, Forward, forward
from gateway.proxy.request import (
    ClientLeft,
    ProxyRequest,
    RouteSpec,
    header,
    parse_request,
    read_body,
    read_json,
)
from gateway.proxy.respond import send_error
from gateway.state import GatewayState

log = logging.getLogger("gateway.proxy")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def request_context(headers: Headers, route: str, method: str, client: Any) -> RequestContext:
    """The request context: the client's ``X-Request-Id`` (bounded) or a new one; start time; address."""
    rid = header(headers, b"x-request-id")
    request_id = rid.decode("latin-1")[:128] if rid else new_request_id()
    return RequestContext(request_id, route, method, client[0] if client else None)


async def observe(observers: list[Observer], ctx: RequestContext) -> None:
    """Classify how the request ended, then hand it to every observer once (one failing never stops the rest)."""
    if ctx.finished is None:
        ctx.finished = time.perf_counter()
    ctx.classify()
    for obs in observers:
        try:
            await obs.on_request_end(ctx)
        except Exception:
            log.exception("observer %s failed", type(obs).__name__, extra={"request_id": ctx.request_id})


async def settle(ticket: Ticket, ctx: RequestContext) -> None:
    try:
        await ticket.settle(ctx)
    except Exception:
        log.exception("settling the admission ticket failed", extra={"request_id": ctx.request_id})


def _describe(ctx: RequestContext, req: ProxyRequest) -> None:
    """Copy what observers and admission read from the parsed request onto the context."""
    ctx.stream = req.stream
    ctx.client_wants_usage = req.client_wants_usage
    ctx.max_tokens = req.max_tokens
    ctx.prompt_chars = req.prompt_chars
    if req.session_id is not None:
        ctx.extra["session_id"] = req.session_id


class ProxyEndpoint:
    """ASGI app for one OpenAI route (``spec.upstream_path``), e.g. ``/v1/chat/completions``."""

    def __init__(self, state: GatewayState, spec: RouteSpec) -> None:
        self.state = state
        self.spec = spec

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        headers: Headers = scope["headers"]
        ctx = request_context(headers, self.spec.route_name, scope.get("method", "POST"), scope.get("client"))
        if state.tracing is not None:
            state.tracing.on_request_start(ctx, headers)
        ticket: Ticket = NO_TICKET
        state.in_flight += 1
        try:
            raw = await self._read(ctx, headers, receive)  # parse: method, draining, body size
            ctx.principal = await state.auth.authenticate(headers)  # authenticate
            req = self._parse(ctx, raw, headers)  # parse: the JSON into a ProxyRequest
            ticket = await state.admission.admit(ctx)  # authorize -> quota -> audit back-pressure -> overload
            conn = scope.get(CONNECTION_KEY)
            await self._forward(ctx, req, receive, send, conn)  # route -> forward -> relay
        except ApiError as e:
            await send_error(ctx, send, e)
        except ClientLeft:
            self._client_left(ctx)
        except asyncio.CancelledError:
            if not ctx.client_gone:
                raise
            self._client_left(ctx)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception as e:  # never a stack trace to the client
            log.exception("unexpected error", extra={"request_id": ctx.request_id})
            await send_error(
                ctx,
                send,
                ApiError(500, "Internal gateway error.", code="internal_error", reason=type(e).__name__),
            )
        finally:
            state.in_flight -= 1
            ctx.finished = time.perf_counter()
            await settle(ticket, ctx)
            await observe(state.observers, ctx)

    @staticmethod
    def _client_left(ctx: RequestContext) -> None:
        ctx.client_gone = True
        ctx.status = ctx.status or 499
        ctx.end(CLIENT_GONE)

    async def _read(self, ctx: RequestContext, headers: Headers, receive: Receive) -> bytes:
        """Method and drain checks, then the body (refused with 413 past ``max_body_bytes``)."""
        state = self.state
        if ctx.method != "POST":
            raise ApiError(405, f"Method {ctx.method} not allowed; use POST.", code="method_not_allowed")
        if state.draining:
            raise ApiError(
                503, "The gateway is shutting down; retry.", code="draining", headers={"retry-after": "1"}
            )
        raw = await read_body(receive, state.settings.max_body_bytes, header(headers, b"content-length"))
        ctx.bytes_in = len(raw)
        return raw

    def _parse(self, ctx: RequestContext, raw: bytes, headers: Headers) -> ProxyRequest:
        """The JSON body, validated into the immutable ProxyRequest (400/404)."""
        settings = self.state.settings
        body, raw = read_json(self.spec, raw, settings)
        ctx.body = body
        model = body.get("model")
        if isinstance(model, str) and model:
            ctx.model = model
        req = parse_request(self.spec, body, raw, headers, ctx.request_id, settings)
        _describe(ctx, req)
        return req

    async def _forward(
        self,
        ctx: RequestContext,
        req: ProxyRequest,
        receive: Receive,
        send: Send,
        connection: DisconnectHook | None = None,
    ) -> None:
        state = self.state
        up_headers = req.upstream_headers
        if state.tracing is not None:
            up_headers = dict(up_headers)
            state.tracing.on_forward(ctx, up_headers)
        job = Forward(
            ctx=ctx,
            req=req,
            headers=up_headers,
            pool=state.pools[req.model.name],
            session=state.sessions[req.model.name],
            router=state.router,
            drain=state,
        )
        await forward(job, receive, send, connection)
