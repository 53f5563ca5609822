"""The proxied OpenAI routes: one plain ASGI endpoint per route, reading as the request path.

parse -> authenticate -> admit (authorize, size, quota, overload: the admission chain) -> route+forward ->
settle -> observe. Each step lives in its own module; this one only orders them and makes sure that the
quota ticket is settled and the observers are called exactly once, whatever happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from gateway.context import RequestContext, client_request_id, new_request_id
from gateway.errors import ApiError
from gateway.hooks import NO_TICKET, Headers, Observer, Ticket
from gateway.http_server import CONNECTION_KEY, body_received
from gateway.outcome import CLIENT_GONE
from gateway.proxy.forward import DisconnectHook, Forward, _watch_disconnect, forward
from gateway.proxy.request import (
    PROXY_HEADERS,
    ClientLeft,
    ProxyRequest,
    RouteSpec,
    check_declared_length,
    closing,
    header,
    parse_request,
    parse_surface_request,
    pick_headers,
    read_body,
    read_json,
    upstream_body,
)
from gateway.proxy.respond import send_error
from gateway.state import GatewayState
from gateway.surface import check_route_served, principal_key, read_request, settle_uncounted

log = logging.getLogger("gateway.proxy")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def request_context(
    headers: Headers | dict[bytes, bytes], route: str, method: str, client: Any, max_id_chars: int = 128
) -> RequestContext:
    """The request context: a new request id of ours (the audit event id), the client's ``X-Request-Id`` kept
    apart when well formed; start time; address."""
    ctx = RequestContext(new_request_id(), route, method, client[0] if client else None)
    ctx.client_request_id = client_request_id(header(headers, b"x-request-id"), max_id_chars)
    return ctx


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


# Engine routes whose JSON request takes vLLM's ``priority`` (generation; not embeddings, audio, ...).
_PRIORITY_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


def _with_engine_priority(ctx: RequestContext, req: ProxyRequest) -> ProxyRequest:
    """The fair queue's class as vLLM's request ``priority`` (engines running --scheduling-policy priority)."""
    prio = ctx.extra.get("engine_priority")
    if prio is None or req.upstream_path not in _PRIORITY_PATHS:
        return req
    force_usage = req.stream and not req.client_wants_usage
    raw = upstream_body(dict(req.body, priority=prio), b"", req.model, force_usage)
    return dataclasses.replace(req, upstream_body=raw)


class ProxyEndpoint:
    """ASGI app for one OpenAI route (``spec.upstream_path``), e.g. ``/v1/chat/completions``."""

    def __init__(self, state: GatewayState, spec: RouteSpec) -> None:
        self.state = state
        self.spec = spec
        session = state.settings.routing.session_header
        # The headers this route reads, picked out of the request's list in one pass.
        self._wanted = PROXY_HEADERS | ({session.lower().encode("latin-1")} if session else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        headers: Headers = scope["headers"]
        picked, credentials = pick_headers(headers, self._wanted)
        ctx = request_context(
            picked,
            self.spec.route_name,
            scope.get("method", "POST"),
            scope.get("client"),
            state.settings.limits.max_request_id_chars,
        )
        if self.spec.model_from == "affinity":
            ctx.extra["url_path"] = scope.get("path", "")[:512]
        if state.tracing is not None:
            state.tracing.on_request_start(ctx, headers)
        ticket: Ticket = NO_TICKET
        state.in_flight += 1
        try:
            # authenticate from the headers, then read the body (size- and time-limited)
            raw = await self._read(ctx, picked, credentials, receive)
            req = self._parse(ctx, raw, picked, scope.get("path_params") or {})  # parse: into a ProxyRequest
            # authorize -> quota -> audit back-pressure -> overload -> fair queue
            if state.admission_waits:
                ticket = await self._admit_watching(ctx, headers, receive)
            else:
                ticket = await state.admission.admit(ctx)
            req = _with_engine_priority(ctx, req)
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
            settle_uncounted(self.spec, ctx)  # tokenize and reads of a stored response are never charged
            await settle(ticket, ctx)
            await observe(state.observers, ctx)

    async def _admit_watching(self, ctx: RequestContext, headers: Headers, receive: Receive) -> Ticket:
        """Admission that may wait (the fair queue): the client leaving while it waits cancels it, which
        gives back its place (and anything the earlier steps hold)."""
        ctx.extra["request_headers"] = headers  # the fair queue reads its class header (and drops this)
        watcher = asyncio.ensure_future(_watch_disconnect(receive, ctx, asyncio.current_task()))
        try:
            return await self.state.admission.admit(ctx)
        finally:
            watcher.cancel()
            ctx.extra.pop("request_headers", None)

    @staticmethod
    def _client_left(ctx: RequestContext) -> None:
        ctx.client_gone = True
        ctx.status = ctx.status or 499
        ctx.end(CLIENT_GONE)

    async def _read(
        self,
        ctx: RequestContext,
        headers: dict[bytes, bytes],
        credentials: list[tuple[bytes, bytes]],
        receive: Receive,
    ) -> bytes:
        """Method and drain checks, the caller's identity from the headers, then the body (size- and
        time-limited).

        Nothing of the body is read before the caller is authenticated: a request without a valid credential
        is answered 401 at once (no ``100 Continue``), and the connection is closed when a body was coming,
        so it costs the gateway no body buffering. The same for a declared ``Content-Length`` over the limit
        (413) and a body that does not arrive within ``limits.body_timeout`` (408)."""
        state = self.state
        limits = state.settings.limits
        spec = self.spec
        if ctx.method not in spec.methods:
            allowed = " or ".join(spec.methods)
            raise ApiError(405, f"Method {ctx.method} not allowed; use {allowed}.", code="method_not_allowed")
        if state.draining:
            raise ApiError(
                503, "The gateway is shutting down; retry.", code="draining", headers={"retry-after": "1"}
            )
        limit = state.settings.max_body_bytes
        if spec.body_limit_setting:  # audio uploads have their own limit
            limit = getattr(state.settings, spec.body_limit_setting)
        content_length = header(headers, b"content-length")
        try:
            ctx.principal = await state.auth.authenticate(credentials)
            check_declared_length(content_length, limit)
        except ApiError as e:
            raise closing(e) from None
        try:
            if body_received(receive):  # the body came with the head: nothing to time out
                raw = await read_body(receive, limit, content_length)
            else:
                async with asyncio.timeout(limits.body_timeout):
                    raw = await read_body(receive, limit, content_length)
        except TimeoutError:
            raise ApiError(
                408,
                f"The request body was not received within {limits.body_timeout:g} s.",
                code="request_timeout",
                headers={"connection": "close"},
            ) from None
        except ApiError as e:
            raise closing(e) from None
        ctx.bytes_in = len(raw)
        return raw

    def _parse(
        self, ctx: RequestContext, raw: bytes, headers: dict[bytes, bytes], path_params: dict[str, str]
    ) -> ProxyRequest:
        """The body (JSON, or a multipart form) or the stored response named in the path, validated into the
        immutable ProxyRequest (400/404)."""
        settings = self.state.settings
        spec = self.spec
        if spec.model_from != "json":
            ct = header(headers, b"content-type")
            sreq = read_request(
                spec,
                raw,
                ct.decode("latin-1") if ct else "",
                path_params,
                principal_key(ctx.principal),
                self.state.responses,
            )
            ctx.body = sreq.body
            ctx.model = sreq.model
            req = parse_surface_request(spec, sreq, headers, ctx.request_id, settings)
            _describe(ctx, req)
            return req
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
        pool = state.pools[req.pool_name]
        check_route_served(self.spec, pool.endpoints, req.model.name)  # nothing an engine lacks is forwarded
        job = Forward(
            ctx=ctx,
            req=req,
            headers=up_headers,
            pool=pool,
            session=state.sessions[req.pool_name],
            router=state.router,
            drain=state,
            responses=state.responses,
        )
        await forward(job, receive, send, connection)
