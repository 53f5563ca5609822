"""The proxied request as the gateway understands it: read once from the HTTP request, then immutable.

``read_body`` enforces the size limit while reading; ``parse_request`` reads from the JSON body only what
the gateway needs (``model``, ``stream``, ``max_tokens``, prompt size, the session key) and decides the
bytes sent upstream: the original bytes, unless the model is renamed for the engine or a stream must ask
for usage (``stream_options.include_usage``), so new OpenAI parameters pass through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import ApiError
from gateway.prompt import prompt_chars
from gateway.routes import RequestTransform, ResponseTransform, RouteSpec
from gateway.settings import GatewaySettings, ModelConfig
from gateway.surface import SurfaceRequest, form_stream, size_request

Headers = list[tuple[bytes, bytes]]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
__all__ = ["RequestTransform", "ResponseTransform", "RouteSpec"]

# Client headers passed on to the engine (W3C trace context).
_FORWARDED_HEADERS = (b"traceparent", b"tracestate")


class ClientLeft(Exception):
    """The client disconnected while its request was being read or relayed."""


@dataclass(slots=True, init=False)  # one per request: plain attribute stores (a frozen init costs more)
class ProxyRequest:
    """What the gateway knows about one proxied request once it is parsed and validated."""

    route: RouteSpec
    model: ModelConfig
    body: dict[str, Any]
    # The bytes sent upstream (the client's own bytes unless the body had to change).
    upstream_body: bytes
    stream: bool
    client_wants_usage: bool
    max_tokens: int | None
    prompt_chars: int
    # The session named by the routing session header (sticky routing), if any.
    session_id: str | None
    # Headers for the engine: content type, request id, trace context, the engine's key.
    upstream_headers: dict[str, str]
    # The model whose replicas serve it (itself, or a LoRA adapter's base), the engine path (placeholders
    # filled) and method, and the one replica that must serve it (a stored response lives there), if any.
    pool_name: str
    upstream_path: str
    method: str
    pinned_endpoint: str | None

    # Written out (init=False): a generated __init__ would run as interpreted code in a compiled module.
    def __init__(
        self,
        route: RouteSpec,
        model: ModelConfig,
        body: dict[str, Any],
        upstream_body: bytes,
        stream: bool,
        client_wants_usage: bool,
        max_tokens: int | None,
        prompt_chars: int,
        session_id: str | None,
        upstream_headers: dict[str, str],
        pool_name: str = "",
        upstream_path: str = "",
        method: str = "POST",
        pinned_endpoint: str | None = None,
    ) -> None:
        self.route = route
        self.model = model
        self.body = body
        self.upstream_body = upstream_body
        self.stream = stream
        self.client_wants_usage = client_wants_usage
        self.max_tokens = max_tokens
        self.prompt_chars = prompt_chars
        self.session_id = session_id
        self.upstream_headers = upstream_headers
        self.pool_name = pool_name
        self.upstream_path = upstream_path
        self.method = method
        self.pinned_endpoint = pinned_endpoint


def header(headers: Headers | dict[bytes, bytes], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), from the request's header list or from the headers
    :func:`pick_headers` kept."""
    if isinstance(headers, dict):
        return headers.get(name)
    for k, v in headers:
        if k == name:
            return v
    return None


# The credential headers (gateway/auth/authenticator.py reads them, and refuses more than one).
CREDENTIAL_HEADERS = frozenset((b"authorization", b"api-key", b"x-api-key"))
# Every header the proxied routes read (the session header comes from the settings).
PROXY_HEADERS = (
    frozenset((b"x-request-id", b"content-length", b"content-type") + _FORWARDED_HEADERS) | CREDENTIAL_HEADERS
)


def pick_headers(
    headers: Headers, wanted: frozenset[bytes]
) -> tuple[dict[bytes, bytes], list[tuple[bytes, bytes]]]:
    """One pass over the request's headers: the first value of each ``wanted`` header, and every credential
    header in order (so that two of them can be refused)."""
    found: dict[bytes, bytes] = {}
    creds: list[tuple[bytes, bytes]] = []
    for k, v in headers:
        if k in wanted:
            if k in CREDENTIAL_HEADERS:
                creds.append((k, v))
            elif k not in found:
                found[k] = v
    return found, creds


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body is larger than the limit of {limit} bytes.", code="request_too_large")


def closing(e: ApiError) -> ApiError:
    """``e``, answered with ``connection: close``: sent before the request's body was read, so the
    connection cannot carry another request (and the unread body is never read)."""
    e.headers.setdefault("connection", "close")
    return e


def check_declared_length(content_length: bytes | None, limit: int) -> None:
    """A declared ``Content-Length`` that is not a number (400) or above ``limit`` (413), before any read."""
    if content_length is None:
        return
    if not content_length.isdigit() or len(content_length) > 18:
        raise ApiError(400, "Invalid Content-Length header.", code="invalid_content_length")
    if int(content_length) > limit:
        raise _too_large(limit)


async def read_body(receive: Receive, limit: int, content_length: bytes | None) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    check_declared_length(content_length, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientLeft()
        chunk: bytes = msg.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_DECODE = msgspec.json.Decoder().decode


def _too_deep(limit: int) -> ApiError:
    return ApiError(
        400, f"The request body nests arrays/objects deeper than {limit} levels.", code="invalid_json"
    )


def check_depth(obj: Any, limit: int) -> None:
    """400 when ``obj`` nests lists/dicts deeper than ``limit`` (iterative: no recursion of our own)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise _too_deep(limit)
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def parse_json_object(raw: bytes, max_depth: int = 64) -> dict[str, Any]:
    """The body as a JSON object; any malformed body (bad syntax, bad encoding, too deep, not an object)
    is a 400 ``invalid_request_error``, never a 500."""
    if not raw:
        raise ApiError(400, "The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        # The fast decoder takes strict UTF-8 JSON only; whatever it refuses (NaN, a BOM, UTF-16, a lone
        # surrogate, bad syntax) goes through the json module below, which accepts or names the problem.
        fast = _DECODE(raw)
    except (msgspec.DecodeError, RecursionError):
        pass
    else:
        if isinstance(fast, dict):
            if raw.count(b"[") + raw.count(b"{") > max_depth:
                check_depth(fast, max_depth)
            return fast
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    if json.detect_encoding(raw) != "utf-8":
        # RFC 8259: JSON between systems is UTF-8 (json.loads would also take UTF-16/32 and a BOM).
        raise ApiError(400, "The request body must be UTF-8 encoded JSON.", code="invalid_json")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(
            400, f"The request body is not valid JSON: {str(e)[:200]}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    # Fewer brackets than the limit cannot nest deeper than it: the walk is only for bodies that might.
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        check_depth(body, max_depth)
    return body


def requested_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "You must provide a model parameter.", param="model", code="missing_model")
    return model


def _model_config(model: str, settings: GatewaySettings) -> ModelConfig:
    mcfg = settings.model(model)
    if mcfg is None:
        raise ApiError(
            404,
            f"The model '{model}' does not exist.",
            param="model",
            code="model_not_found",
            reason="not_found",
        )
    return mcfg


def _stream(body: dict[str, Any], route: RouteSpec) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean.", param="stream", code="invalid_type")
    if stream and not route.streamable:
        raise ApiError(400, "This endpoint does not support streaming.", param="stream", code="invalid_value")
    return stream


def _stream_options(body: dict[str, Any]) -> dict[str, Any] | None:
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(
            400, "'stream_options' must be an object.", param="stream_options", code="invalid_type"
        )
    return so


def upstream_body(body: dict[str, Any], raw: bytes, mcfg: ModelConfig, force_usage: bool) -> bytes:
    """The bytes for the engine: the client's own unless the model name or stream options must change."""
    changed = not raw
    if mcfg.upstream_model and mcfg.upstream_model != body["model"]:
        body = dict(body, model=mcfg.upstream_model)
        changed = True
    if force_usage and not changed and "stream_options" not in body:
        # The usual streamed request (no stream_options): the client's bytes with the key added at the end,
        # instead of encoding the whole body again. ``raw`` is a JSON object (parsed above) with a member.
        end = raw.rstrip()
        if body and end.endswith(b"}"):
            return end[:-1] + b',"stream_options":{"include_usage":true}}'
    if force_usage:
        body = dict(body, stream_options=dict(body.get("stream_options") or {}, include_usage=True))
        changed = True
    if changed:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    return raw


def _upstream_headers(
    headers: Headers | dict[bytes, bytes],
    request_id: str,
    mcfg: ModelConfig,
    content_type: str = "application/json",
) -> dict[str, str]:
    out = {"content-type": content_type, "x-request-id": request_id}
    for name in _FORWARDED_HEADERS:
        v = header(headers, name)
        if v is not None:
            out[name.decode()] = v.decode("latin-1")
    if mcfg.upstream_api_key:
        out["authorization"] = "Bearer " + mcfg.upstream_api_key
    return out


def _session_id(headers: Headers | dict[bytes, bytes], session_header: bytes | None) -> str | None:
    if not session_header:
        return None
    sid = header(headers, session_header)
    return sid.decode("latin-1")[:256] if sid else None


def read_json(route: RouteSpec, raw: bytes, settings: GatewaySettings) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object (after the route's transform), and the raw bytes still valid for it
    (empty when the transform changed the body)."""
    body = parse_json_object(raw, settings.limits.max_json_depth)
    if route.request_transform is not None:
        return route.request_transform(body, settings), b""
    return body, raw


def parse_request(
    route: RouteSpec,
    body: dict[str, Any],
    raw: bytes,
    headers: Headers | dict[bytes, bytes],
    request_id: str,
    settings: GatewaySettings,
) -> ProxyRequest:
    """Validate a parsed body; raises ApiError (400/404) naming the culprit."""
    mcfg = _model_config(requested_model(body), settings)
    stream = _stream(body, route)
    max_tokens = size_request(route, body)
    wants_usage = not route.forces_stream_usage  # nothing added to the request: nothing to hide
    if stream and route.forces_stream_usage:
        so = _stream_options(body)
        wants_usage = bool(so and so.get("include_usage"))
    session_header = settings.routing.session_header
    return ProxyRequest(
        route=route,
        model=mcfg,
        body=body,
        upstream_body=upstream_body(body, raw, mcfg, stream and not wants_usage),
        stream=stream,
        client_wants_usage=wants_usage,
        max_tokens=max_tokens,
        prompt_chars=prompt_chars(body) if route.counts_tokens else 0,
        session_id=_session_id(headers, session_header.lower().encode("latin-1") if session_header else None),
        upstream_headers=_upstream_headers(headers, request_id, mcfg),
        pool_name=settings.pool_name(mcfg.name),
        upstream_path=route.upstream_path,
        method=route.methods[0],
    )


def parse_surface_request(
    route: RouteSpec,
    sreq: SurfaceRequest,
    headers: Headers | dict[bytes, bytes],
    request_id: str,
    settings: GatewaySettings,
) -> ProxyRequest:
    """A request whose model is not in a JSON body (a multipart form, a stored response's id); its bytes go
    to the engine as they came."""
    mcfg = _model_config(sreq.model, settings)
    stream = route.model_from == "form" and form_stream(sreq.body)
    if stream and not route.streamable:
        raise ApiError(400, "This endpoint does not support streaming.", param="stream", code="invalid_value")
    session_header = settings.routing.session_header
    return ProxyRequest(
        route=route,
        model=mcfg,
        body=sreq.body,
        upstream_body=sreq.raw,
        stream=stream,
        client_wants_usage=True,
        max_tokens=size_request(route, sreq.body),
        prompt_chars=0,
        session_id=_session_id(headers, session_header.lower().encode("latin-1") if session_header else None),
        upstream_headers=_upstream_headers(headers, request_id, mcfg, sreq.content_type),
        pool_name=settings.pool_name(mcfg.name),
        upstream_path=sreq.upstream_path,
        method=route.methods[0],
        pinned_endpoint=sreq.pinned_endpoint,
    )
