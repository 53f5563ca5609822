"""The hot path: a plain ASGI endpoint that authenticates, admits, routes and relays one request.

It reads from the body only what it needs (``model``, ``stream``, ``max_tokens``, prompt size) and forwards
the original bytes otherwise, so new OpenAI parameters pass through untouched. The one exception: for
streamed chat/completions it sets ``stream_options.include_usage`` so the gateway always learns the real
usage, and strips that usage chunk again when the client did not ask for it.

Streams are relayed chunk by chunk as the engine sends them. When the client goes away the upstream
response is closed at once, which makes vLLM abort the request and free its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway.context import RequestContext, new_request_id
from gateway.errors import ApiError, error_body, sse_error_event
from gateway.hooks import NO_TICKET, Ticket
from gateway.prompt import content_text
from gateway.responses_api import ResponsesStream
from gateway.routes import RouteSpec
from gateway.surface import (
    SurfaceRequest,
    check_route_served,
    form_stream,
    principal_key,
    read_request,
    remember_response,
    settle_uncounted,
    size_request,
    take_usage,
)

log = logging.getLogger("gateway.proxy")

_JSON_CT = (b"content-type", b"application/json")
_SSE_CT = (b"content-type", b"text/event-stream; charset=utf-8")
_DONE = b"data: [DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"
_HOP_HEADERS_IN = (b"traceparent", b"tracestate")

ResponseTransform = Callable[[dict[str, Any]], dict[str, Any]]
RequestTransform = Callable[[dict[str, Any], Any], dict[str, Any]]


def _header(scope_headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in scope_headers:
        if k == name:
            return v
    return None


async def read_body(receive, limit: int, content_length: bytes | None) -> bytes:
    if content_length is not None:
        try:
            if int(content_length) > limit:
                raise ApiError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large")
        except ValueError:
            raise ApiError(400, "Invalid Content-Length header.") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = msg.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large")
            chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _ClientGone(Exception):
    pass


class _UpstreamFault(Exception):
    """An attempt failed on the upstream's side before anything reached the client (retryable)."""

    def __init__(self, kind: str, message: str, status: int = 0, body: bytes = b"") -> None:
        super().__init__(message)
        self.kind = kind  # connect | 5xx | timeout | broken
        self.message = message
        self.status = status
        self.body = body

    def api_error(self, model: str | None) -> ApiError:
        if self.kind == "timeout":
            return ApiError(504, f"The model server for '{model}' did not answer in time.", code="upstream_timeout", reason="upstream_error")
        if self.kind == "connect":
            return ApiError(502, f"The model server for '{model}' is unreachable.", code="upstream_unreachable", reason="upstream_error")
        return ApiError(502, f"The model server for '{model}' failed: {self.message}.", code="upstream_error", reason="upstream_error")


class _DrainDeadline(Exception):
    """The gateway's drain deadline passed while this stream was still running."""


class _StreamStart:
    """The first complete event(s) of an upstream stream, read before the client response starts."""

    __slots__ = ("buf",)

    def __init__(self, buf: bytes) -> None:
        self.buf = buf


async def _read_first_event(resp: aiohttp.ClientResponse) -> bytes:
    """Read until the stream holds one complete event; a stream that ends before that is broken."""
    buf = b""
    while b"\n\n" not in buf:
        chunk = await resp.content.readany()
        if not chunk:
            raise aiohttp.ClientPayloadError("the stream ended before its first event")
        buf += chunk
    return buf


def prompt_chars(body: dict[str, Any]) -> int:
    """A cheap size of the prompt in characters (messages' text, prompt, or input)."""
    n = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict):
                text = content_text(m.get("content"))
                if text is not None:
                    n += len(text)
        return n
    for key in ("prompt", "input"):
        p = body.get(key)
        if isinstance(p, str):
            return len(p)
        if isinstance(p, list):
            for x in p:
                if isinstance(x, str):
                    n += len(x)
                elif isinstance(x, list):
                    n += len(x) * 4  # token ids: ~4 chars each
            return n
    return n


class ProxyEndpoint:
    """ASGI app for one OpenAI route, described by its ``RouteSpec`` (``gateway/routes.py``)."""

    def __init__(self, spec: RouteSpec) -> None:
        self.spec = spec
        self.upstream_path = spec.upstream_path
        self.streamable = spec.streamable
        self.request_transform = spec.request_transform
        self.response_transform = spec.response_transform
        self.route_name = spec.route_name

    async def __call__(self, scope, receive, send) -> None:
        state = scope["app"].state.gateway
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        rid = _header(headers, b"x-request-id")
        request_id = rid.decode("latin-1")[:128] if rid else new_request_id()
        client = scope.get("client")
        ctx = RequestContext(request_id, self.route_name, scope.get("method", "POST"), client[0] if client else None)
        ticket: Ticket = NO_TICKET
        admitted = False
        if state.tracing is not None:
            state.tracing.on_request_start(ctx, headers)
        state.in_flight += 1
        spec = self.spec
        sreq: SurfaceRequest | None = None
        try:
            method = scope.get("method")
            if method not in spec.methods:
                raise ApiError(405, f"Method {method} not allowed; use {' or '.join(spec.methods)}.", code="method_not_allowed")
            if state.draining:
                raise ApiError(503, "The gateway is shutting down; retry.", code="draining", headers={"retry-after": "1"})
            limit = getattr(state.settings, spec.body_limit_setting) if spec.body_limit_setting else state.settings.max_body_bytes
            raw = await read_body(receive, limit, _header(headers, b"content-length"))
            ctx.bytes_in = len(raw)
            ctx.principal = await state.auth.authenticate(headers)
            ct = _header(headers, b"content-type")
            sreq = read_request(
                spec, raw, ct.decode("latin-1") if ct else "", scope.get("path_params") or {}, principal_key(ctx.principal), state.responses
            )
            body = sreq.body
            if self.request_transform is not None:
                body = self.request_transform(body, state)
                raw = b""  # re-serialize below
            ctx.body = body
            model = body.get("model") if spec.model_from == "json" else sreq.model
            if not isinstance(model, str) or not model:
                raise ApiError(400, "You must provide a model parameter.", param="model", code="missing_model")
            ctx.model = model
            mcfg = state.settings.model(model)
            pool_name = state.settings.pool_name(model)
            pool = state.pools.get(pool_name)
            if mcfg is None or pool is None:
                raise ApiError(
                    404, f"The model '{model}' does not exist.", param="model", code="model_not_found", reason="not_found"
                )
            state.auth.authorize(ctx.principal, model)
            check_route_served(spec, pool.endpoints, model)
            if spec.model_from == "json":
                raw = self._prepare_upstream_body(ctx, body, raw, mcfg)
            else:
                ctx.stream = spec.model_from == "form" and form_stream(body)
                if ctx.stream and not spec.streamable:
                    raise ApiError(400, "This endpoint does not support streaming.", param="stream", code="invalid_value")
                ctx.max_tokens = size_request(spec, body)
                ctx.prompt_chars = 0
                ctx.client_wants_usage = True  # nothing was added to the request: hide nothing
            ticket = await state.admission.admit(ctx)
            admitted = True
            await self._forward(ctx, state, pool, mcfg, raw, headers, receive, send, sreq, pool_name)
        except ApiError as e:
            await self._send_error(ctx, send, e)
        except _ClientGone:
            ctx.client_gone = True
            ctx.status = ctx.status or 499
            ctx.decision = "client_closed"
        except asyncio.CancelledError:
            if not ctx.client_gone:
                raise
            ctx.status = ctx.status or 499
            if ctx.decision == "allowed":
                ctx.decision = "client_closed"
            t = asyncio.current_task()
            if t is not None:
                t.uncancel()
        except Exception as e:  # never a stack trace to the client
            log.exception("unexpected error", extra={"request_id": ctx.request_id})
            await self._send_error(ctx, send, ApiError(500, "Internal gateway error.", code="internal_error", reason=type(e).__name__))
        finally:
            state.in_flight -= 1
            ctx.finished = time.perf_counter()
            settle_uncounted(spec, ctx)
            if admitted:
                try:
                    await ticket.settle(ctx)
                except Exception:
                    log.exception("settling the quota ticket failed", extra={"request_id": ctx.request_id})
            for obs in state.observers:
                try:
                    await obs.on_request_end(ctx)
                except Exception:
                    log.exception("observer %s failed", type(obs).__name__, extra={"request_id": ctx.request_id})

    # -- request --------------------------------------------------------------------------------------------

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any]:
        if not raw:
            raise ApiError(400, "The request body is empty; expected a JSON object.", code="invalid_json")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    def _prepare_upstream_body(self, ctx: RequestContext, body: dict[str, Any], raw: bytes, mcfg) -> bytes:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean.", param="stream", code="invalid_type")
        if stream and not self.streamable:
            raise ApiError(400, "This endpoint does not support streaming.", param="stream", code="invalid_value")
        ctx.stream = stream
        ctx.max_tokens = size_request(self.spec, body)
        ctx.prompt_chars = prompt_chars(body) if self.spec.counts_tokens else 0
        changed = not raw
        if mcfg.upstream_model and mcfg.upstream_model != body["model"]:
            body = dict(body, model=mcfg.upstream_model)
            changed = True
        if stream and self.spec.forces_stream_usage:
            so = body.get("stream_options")
            if so is not None and not isinstance(so, dict):
                raise ApiError(400, "'stream_options' must be an object.", param="stream_options", code="invalid_type")
            ctx.client_wants_usage = bool(so and so.get("include_usage"))
            if not ctx.client_wants_usage:
                body = dict(body, stream_options=dict(so or {}, include_usage=True))
                changed = True
        if changed:
            return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        return raw

    # -- forwarding -----------------------------------------------------------------------------------------
    #
    # Each attempt runs in two stages. Stage one sends the request and reads up to the first byte that could
    # go to the client (the whole body of a non-streamed answer, the first complete event of a stream),
    # bounded by the time-to-first-byte timeout. Any upstream fault there (refused or broken connection, 5xx,
    # timeout) is retried on another replica while the request has attempts left and the pool's retry budget
    # has room: the client has seen nothing yet. Stage two commits: the response starts, and from then on a
    # fault ends the stream with an OpenAI-style error event instead (never a retry, never a hang), bounded
    # by the idle-gap timeout between chunks. The total timeout bounds both stages.

    async def _forward(self, ctx, state, pool, mcfg, raw, headers, receive, send, sreq: SurfaceRequest, pool_name: str) -> None:
        session: aiohttp.ClientSession = state.sessions[pool_name]
        up_headers = {"content-type": sreq.content_type, "x-request-id": ctx.request_id}
        for name in _HOP_HEADERS_IN:
            v = _header(headers, name)
            if v is not None:
                up_headers[name.decode()] = v.decode("latin-1")
        if mcfg.upstream_api_key:
            up_headers["authorization"] = "Bearer " + mcfg.upstream_api_key
        if state.tracing is not None:
            state.tracing.on_forward(ctx, up_headers)
        session_header = state.settings.routing.session_header
        if session_header:
            sid = _header(headers, session_header.lower().encode("latin-1"))
            if sid:
                ctx.extra["session_id"] = sid.decode("latin-1")[:256]

        router = state.router
        timeouts = mcfg.timeouts
        loop = asyncio.get_running_loop()
        total_at = loop.time() + timeouts.total if timeouts.total else None
        watcher = asyncio.ensure_future(_watch_disconnect(receive, ctx, asyncio.current_task()))
        tried: set[str] = set()
        last_fault: _UpstreamFault | None = None
        try:
            while True:
                if sreq.pinned_endpoint is not None:
                    # A stored response lives on one replica: that one or none (no retries elsewhere).
                    ep = next((e for e in pool.endpoints if e.url == sreq.pinned_endpoint and e.url not in tried), None)
                    if ep is None and not tried:
                        raise ApiError(
                            404, "The replica that stored this response is gone.", param=self.spec.affinity_param, code="response_not_found"
                        )
                else:
                    ep = router.pick(pool, ctx, exclude=tried)
                if ep is None:
                    if tried:
                        if last_fault is not None and last_fault.kind == "timeout":
                            # Every replica tried timed out: that is a gateway timeout, not a bad gateway.
                            raise last_fault.api_error(ctx.model)
                        raise ApiError(502, f"All replicas of '{ctx.model}' failed: {ctx.error_message}", code="upstream_unavailable", reason="upstream_error")
                    ctx.upstream_errors.append("no_healthy_replica")
                    raise ApiError(
                        503,
                        f"No healthy replica is serving '{ctx.model}' right now; retry shortly.",
                        code="no_healthy_upstream",
                        headers={"retry-after": "2"},
                        reason="upstream_error",
                    )
                tried.add(ep.url)
                ctx.endpoint = ep.url
                ctx.attempts += 1
                if ctx.forwarded_at is None:
                    ctx.forwarded_at = time.perf_counter()
                ep.in_flight += 1
                verdict: str | None = None  # None: no verdict (client left); "ok"; or an upstream fault kind
                resp = None
                try:
                    try:
                        resp, first = await self._attempt(session, ep.url + sreq.upstream_path, raw, up_headers, ctx, timeouts, total_at, loop)
                    except _UpstreamFault as f:
                        verdict = f.kind
                        last_fault = f
                        ctx.error_message = f.message
                        ctx.upstream_errors.append("http_5xx" if f.kind == "5xx" else f.kind)
                        if router.may_retry(pool, ctx):
                            continue
                        if f.status:
                            # Out of attempts: pass the engine's own 5xx on (in OpenAI's shape).
                            ctx.decision, ctx.reason = "upstream_error", f"upstream_{f.status}"
                            await self._send_whole(ctx, f.status, "application/json", f.body, send)
                            return
                        raise f.api_error(ctx.model) from None
                    verdict = "ok"
                    if isinstance(first, _StreamStart):
                        fault = await self._relay_stream(ctx, resp, first.buf, send, timeouts.idle_s, total_at, loop, state)
                        if fault is not None:
                            verdict = fault
                    else:
                        await self._send_whole(ctx, resp.status, resp.headers.get("content-type", ""), first, send, state.responses)
                    return
                finally:
                    ep.in_flight -= 1
                    if resp is not None:
                        # Fully read responses already went back to the pool; anything else (a client
                        # that left mid-stream) closes the connection, which makes vLLM abort the request.
                        resp.close()
                    if verdict is None:
                        router.on_abandon(pool, ep, ctx)
                    elif verdict == "ok":
                        router.on_success(pool, ep, ctx)
                    else:
                        router.on_failure(pool, ep, ctx, verdict)
        finally:
            watcher.cancel()

    async def _attempt(self, session, url, raw, up_headers, ctx, timeouts, total_at, loop):
        """Stage one (see above): returns (response, body bytes | _StreamStart) or raises _UpstreamFault."""
        deadline = loop.time() + timeouts.first_byte_s
        if total_at is not None and total_at < deadline:
            deadline = total_at
        resp: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout_at(deadline):
                resp = await session.request(self.spec.methods[0], url, data=raw or None, headers=up_headers)
                ctx.ttfb = time.perf_counter() - ctx.started
                if resp.status >= 500:
                    body = await resp.read()
                    raise _UpstreamFault("5xx", f"replica answered {resp.status}", resp.status, body)
                if resp.status == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
                    return resp, _StreamStart(await _read_first_event(resp))
                return resp, await resp.read()
        except _UpstreamFault:
            if resp is not None:
                resp.close()
            raise
        except TimeoutError:
            if resp is not None:
                resp.close()
            total = total_at is not None and loop.time() >= total_at
            raise _UpstreamFault("timeout", "replica did not answer in time" if not total else "request ran past its total timeout") from None
        except (aiohttp.ClientError, OSError) as e:
            if resp is not None:
                resp.close()
            kind = "connect" if resp is None and isinstance(e, aiohttp.ClientConnectorError) else "broken"
            raise _UpstreamFault(kind, f"cannot reach replica ({type(e).__name__})" if kind == "connect" else f"replica broke the connection ({type(e).__name__})") from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise

    async def _send_whole(self, ctx: RequestContext, status: int, content_type: str, data: bytes, send, index=None) -> None:
        ctx.status = status
        out_headers = [(b"content-type", content_type.encode("latin-1") or _JSON_CT[1])]
        out_headers.append((b"x-request-id", ctx.request_id.encode()))
        out_headers.extend(ctx.response_headers)
        if status == 200:
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                take_usage(self.spec, ctx, obj.get("usage"))
                remember_response(self.spec, ctx, index, obj)
                if self.response_transform is not None:
                    obj = self.response_transform(obj)
                    data = json.dumps(obj, ensure_ascii=False).encode()
        else:
            if ctx.decision == "allowed":
                ctx.decision = "upstream_error" if status >= 500 else "invalid_request"
            ctx.reason = ctx.reason or f"upstream_{status}"
            data = _normalize_error(data, status)
            out_headers[0] = _JSON_CT
        ctx.first_token_at = time.perf_counter()
        ctx.ttft = ctx.first_token_at - ctx.started
        ctx.bytes_out = len(data)
        ctx.extra["response_started"] = True
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _relay_stream(self, ctx: RequestContext, resp: aiohttp.ClientResponse, buf: bytes, send, idle: float, total_at: float | None, loop, state) -> str | None:
        """Stage two for a stream: relay events as they come. Returns None, or the upstream fault that ended
        the stream (the client then got an error event and a clean end of the stream)."""
        ctx.status = resp.status
        out_headers = [_SSE_CT, (b"x-request-id", ctx.request_id.encode())]
        out_headers.extend(ctx.response_headers)
        out_headers.append((b"cache-control", b"no-cache"))
        out_headers.append((b"x-accel-buffering", b"no"))
        ctx.extra["response_started"] = True
        await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
        hide_usage = not ctx.client_wants_usage
        saw_done = False
        # Responses API streams: typed events, usage in the terminal event, no [DONE].
        typed = ResponsesStream() if self.spec.usage == "responses" else None
        recorded = False
        fault: str | None = None
        content = resp.content
        try:
            async with asyncio.timeout(None) as to:
                while True:
                    # Forward complete SSE events only; keep a partial trailing event for the next read.
                    cut = buf.rfind(b"\n\n")
                    if cut >= 0:
                        events, buf = buf[: cut + 2], buf[cut + 2 :]
                        if typed is not None:
                            typed.feed(events)
                            if typed.response_id and not recorded:
                                remember_response(self.spec, ctx, state.responses, typed.response_id)
                                recorded = True
                            if typed.usage is not None:
                                take_usage(self.spec, ctx, typed.usage)
                            saw_done = saw_done or typed.terminal is not None
                        elif b'"usage":{' in events:
                            events = _take_stream_usage(ctx, events, hide_usage)
                        if events:
                            now = time.perf_counter()
                            if ctx.first_token_at is None:
                                ctx.first_token_at = now
                                ctx.ttft = now - ctx.started
                            elif ctx.last_chunk_at is not None:
                                ctx.chunk_gaps.append(now - ctx.last_chunk_at)
                            ctx.last_chunk_at = now
                            ctx.bytes_out += len(events)
                            if events.endswith(_DONE_EVENT):
                                saw_done = True
                            await send({"type": "http.response.body", "body": events, "more_body": True})
                    wake = loop.time() + idle
                    to.reschedule(wake if total_at is None or wake < total_at else total_at)
                    chunk = await content.readany()
                    to.reschedule(None)
                    if not chunk:
                        break
                    buf += chunk
                    if state.drain_expired:
                        raise _DrainDeadline()
        except _DrainDeadline:
            ctx.decision, ctx.reason = "overloaded", "drain_deadline"
            tail = sse_error_event("The gateway is shutting down and could not finish this stream in time; retry.", "service_unavailable", "draining")
        except TimeoutError:
            fault = "timeout"
            ctx.decision = "upstream_error"
            ctx.upstream_errors.append("stream_idle_timeout")
            if total_at is not None and loop.time() >= total_at:
                ctx.reason = "stream_total_timeout"
                tail = sse_error_event("The request ran past its total time limit.", "timeout_error", "upstream_timeout")
            else:
                ctx.reason = "stream_idle_timeout"
                tail = sse_error_event("The model server stopped sending (idle timeout).", "timeout_error", "upstream_timeout")
        except (aiohttp.ClientError, OSError) as e:
            fault = "broken"
            ctx.decision, ctx.reason = "upstream_error", "stream_broken"
            ctx.upstream_errors.append("stream_broken")
            tail = sse_error_event(f"The model server broke the stream ({type(e).__name__}).", "upstream_error", "upstream_disconnected")
        else:
            if buf.strip():
                # The stream ended without a final blank line: pass on what is left as it is.
                if typed is not None:
                    typed.feed(buf)
                    if typed.usage is not None:
                        take_usage(self.spec, ctx, typed.usage)
                    saw_done = saw_done or typed.terminal is not None
                elif b'"usage":{' in buf:
                    buf = _take_stream_usage(ctx, buf, hide_usage)
                saw_done = saw_done or buf.rstrip().endswith(_DONE)
            if saw_done:
                tail = buf
            else:
                fault = "broken"
                ctx.upstream_errors.append("stream_broken")
                ctx.decision, ctx.reason = "upstream_error", "stream_truncated"
                tail = buf + sse_error_event("The model server ended the stream early.", "upstream_error", "upstream_disconnected")
        ctx.bytes_out += len(tail)
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        return fault

    async def _send_error(self, ctx: RequestContext, send, e: ApiError) -> None:
        ctx.status = e.status
        ctx.error_message = e.message
        if ctx.decision == "allowed":
            ctx.decision = _decision_for(e)
        ctx.reason = ctx.reason or e.reason
        if ctx.extra.get("response_started"):
            return
        body = e.body()
        ctx.bytes_out = len(body)
        headers = [_JSON_CT, (b"x-request-id", ctx.request_id.encode())]
        headers.extend((k.encode(), v.encode()) for k, v in e.headers.items())
        headers.extend(ctx.response_headers)
        try:
            await send({"type": "http.response.start", "status": e.status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        except Exception:  # client already gone
            ctx.client_gone = True


def _decision_for(e: ApiError) -> str:
    if e.reason == "auth_unavailable":
        # The identity provider's keys could not be had (fail closed): the caller is not authenticated.
        return "unauthenticated"
    return {
        401: "unauthenticated",
        403: "forbidden",
        404: "not_found",
        429: "rate_limited",
        502: "upstream_error",
        504: "upstream_error",
    }.get(e.status, "overloaded" if e.status == 503 and e.reason != "upstream_error" else ("upstream_error" if e.status >= 500 else "invalid_request"))


def _take_usage(ctx: RequestContext, usage: Any) -> None:
    if isinstance(usage, dict):
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(pt, int):
            ctx.prompt_tokens = pt
        if isinstance(ct, int):
            ctx.completion_tokens = ct
        elif isinstance(pt, int) and isinstance(usage.get("total_tokens"), int):
            ctx.completion_tokens = usage["total_tokens"] - pt  # embeddings report no completion tokens


def _take_stream_usage(ctx: RequestContext, events: bytes, hide: bool) -> bytes:
    """Record usage from the usage-only chunk (``"choices":[]``) and drop that event if ``hide``."""
    out: list[bytes] = []
    for ev in events.split(b"\n\n"):
        if not ev:
            continue
        if b'"usage":{' in ev and ev.startswith(b"data: {"):
            try:
                obj = json.loads(ev[6:])
            except ValueError:
                out.append(ev)
                continue
            _take_usage(ctx, obj.get("usage"))
            if hide and obj.get("choices") == []:
                continue
        out.append(ev)
    return b"".join(e + b"\n\n" for e in out)


def _normalize_error(data: bytes, status: int) -> bytes:
    """Pass on the engine's error if it is OpenAI-shaped, else wrap it so clients always see that shape."""
    try:
        obj = json.loads(data)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict) and "message" in obj["error"]:
            return data
        msg = obj.get("detail") or obj.get("message") if isinstance(obj, dict) else None
    except ValueError:
        msg = None
    text = str(msg) if msg else data[:500].decode("utf-8", "replace") or f"upstream status {status}"
    return error_body(text, "upstream_error" if status >= 500 else "invalid_request_error", None, None)


async def _watch_disconnect(receive, ctx: RequestContext, task: asyncio.Task | None) -> None:
    """Wait for the client to go away; then cancel the forwarding task so the upstream request is closed."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            ctx.client_gone = True
            if task is not None and not task.done():
                task.cancel()
            return
