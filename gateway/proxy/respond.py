"""Writing the client's response: a whole body, the start of a stream, or an OpenAI-shaped error.

Each function records on the request context what it sent (status, bytes, first-byte time) and, for an
answer that is not a success, how the request ended (``ctx.end``); ``gateway/outcome.py`` classifies it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from gateway.context import RequestContext, response_request_id
from gateway.errors import ApiError, error_body
from gateway.outcome import CLIENT_GONE, UpstreamStatus
from gateway.proxy.shapes import USAGE_ONLY
from gateway.proxy.sse import usage_of
from gateway.responses_api import ResponseIndex
from gateway.routes import ResponseTransform, RouteSpec
from gateway.surface import remember_response, take_usage

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

JSON_CT = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def record_usage(ctx: RequestContext, obj: Any) -> None:
    usage = usage_of(obj)
    if usage is not None:
        if usage.prompt_tokens is not None:
            ctx.prompt_tokens = usage.prompt_tokens
        if usage.completion_tokens is not None:
            ctx.completion_tokens = usage.completion_tokens


def normalize_error(data: bytes, status: int) -> bytes:
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


def _success_body(
    ctx: RequestContext,
    data: bytes,
    transform: ResponseTransform | None,
    route: RouteSpec | None = None,
    responses: ResponseIndex | None = None,
) -> bytes:
    if transform is None and route is not None and not route.records_affinity:
        # Only the usage is needed: read it without building the whole answer.
        try:
            take_usage(route, ctx, USAGE_ONLY.decode(data).usage)
            return data
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass  # not a JSON object (or not one msgspec takes): the general path below decides
    try:
        obj = json.loads(data)
    except ValueError:
        return data
    if not isinstance(obj, dict):
        return data
    if route is None:
        record_usage(ctx, obj)
    else:  # the route's own usage fields; a response the engine stored is remembered with its replica
        take_usage(route, ctx, obj.get("usage"))
        remember_response(route, ctx, responses, obj)
    if transform is None:
        return data
    return json.dumps(transform(obj), ensure_ascii=False).encode()


async def send_whole(
    ctx: RequestContext,
    status: int,
    content_type: str,
    data: bytes,
    send: Send,
    transform: ResponseTransform | None = None,
    route: RouteSpec | None = None,
    responses: ResponseIndex | None = None,
) -> None:
    """A complete (non-streamed) answer from the engine, passed on; a non-200 one in OpenAI's error shape."""
    ctx.status = status
    headers = [(b"content-type", content_type.encode("latin-1") or JSON_CT[1])]
    if status == 200:
        data = _success_body(ctx, data, transform, route, responses)
    else:
        ctx.end(UpstreamStatus(status))
        data = normalize_error(data, status)
        headers[0] = JSON_CT
    headers.append((b"content-length", str(len(data)).encode()))
    headers.append((b"x-request-id", response_request_id(ctx)))
    headers.extend(ctx.response_headers)
    ctx.first_token_at = time.perf_counter()
    ctx.ttft = ctx.first_token_at - ctx.started
    ctx.bytes_out = len(data)
    ctx.extra["response_started"] = True
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def start_stream(ctx: RequestContext, status: int, send: Send) -> None:
    ctx.status = status
    headers = [_SSE_HEADERS[0], (b"x-request-id", response_request_id(ctx))]
    headers.extend(ctx.response_headers)
    headers.extend(_SSE_HEADERS[1:])
    ctx.extra["response_started"] = True
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def send_error(ctx: RequestContext, send: Send, e: ApiError) -> None:
    """An OpenAI-shaped error, unless the response already started (then it is only recorded)."""
    ctx.end(e)
    ctx.status = e.status
    ctx.error_message = e.message
    if ctx.extra.get("response_started"):
        return
    body = e.body()
    ctx.bytes_out = len(body)
    headers = [
        JSON_CT,
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", response_request_id(ctx)),
    ]
    headers.extend((k.encode(), v.encode()) for k, v in e.headers.items())
    headers.extend(ctx.response_headers)
    try:
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except Exception:  # the client is already gone
        ctx.client_gone = True
        ctx.end(CLIENT_GONE)
