"""The per-route steps of the proxied request path, driven by the route table (``gateway/routes.py``).

The proxy calls these at fixed points; everything that differs between OpenAI routes is here:

- ``read_request``: the model and the body the gateway reads (JSON body, multipart form fields, or the
  replica remembered for a stored response), with a clear 400/404 naming the culprit;
- ``check_route_served``: a route the model's engines do not serve is refused (400 ``unsupported_route``),
  never forwarded blindly, so nothing an engine lacks is offered;
- ``size_request``: the max_tokens and prompt size quotas reserve;
- ``take_usage``, ``after_response``: usage settled from the engine's answer and response ids remembered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.multipart import parse_form
from gateway.responses_api import ResponseIndex, response_id_of
from gateway.routes import RouteSpec, usage_tokens
from gateway.routing.catalog import pool_serves_path


@dataclass(slots=True)
class SurfaceRequest:
    """What the gateway read from one request, before the common path (authorize, admit, route) runs."""

    body: dict[str, Any]
    model: str
    # The bytes for the engine ("" = re-serialize ``body``) and their content type.
    raw: bytes
    content_type: str
    # The replica that must serve it (a stored response lives there), if any.
    pinned_endpoint: str | None = None
    # The engine path, placeholders filled.
    upstream_path: str = ""


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ApiError(400, "The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _missing_model() -> ApiError:
    return ApiError(400, "You must provide a model parameter.", param="model", code="missing_model")


def read_request(
    spec: RouteSpec,
    raw: bytes,
    content_type: str,
    path_params: dict[str, str],
    principal_id: str | None,
    index: ResponseIndex | None,
) -> SurfaceRequest:
    upstream_path = spec.upstream_url_path(path_params) if path_params else spec.upstream_path
    if spec.model_from == "form":
        form = parse_form(raw, content_type)
        model = form.fields.get("model", "").strip()
        if not model:
            raise _missing_model()
        if "file" not in form.files:
            raise ApiError(
                400,
                "You must upload the audio as the multipart field 'file'.",
                param="file",
                code="missing_file",
            )
        if form.files["file"] == 0:
            raise ApiError(400, "The uploaded 'file' is empty.", param="file", code="empty_file")
        # Only the text fields: the audit content policy and stream detection read them; the bytes go as they came.
        return SurfaceRequest(dict(form.fields), model, raw, content_type, upstream_path=upstream_path)
    if spec.model_from == "affinity":
        rid = path_params.get(spec.affinity_param or "", "")
        stored = index.lookup(rid) if index is not None else None
        if stored is None or stored.principal != principal_id:
            # Another caller's response is as unknown as one that never existed.
            raise ApiError(
                404,
                f"Response with id '{rid}' not found.",
                param=spec.affinity_param,
                code="response_not_found",
            )
        return SurfaceRequest(
            {"model": stored.model},
            stored.model,
            raw,
            content_type or "application/json",
            stored.endpoint,
            upstream_path,
        )
    body = _json_object(raw)
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise _missing_model()
    return SurfaceRequest(body, name, raw, "application/json", upstream_path=upstream_path)


def check_route_served(spec: RouteSpec, endpoints: list[Any], model: str) -> None:
    """400 when the model's engines are known not to serve the route (unknown = forwarded)."""
    if pool_serves_path(endpoints, spec.upstream_path) is False:
        raise ApiError(
            400,
            f"The model '{model}' does not support {spec.public_path} (its engine does not serve that route).",
            param="model",
            code="unsupported_route",
        )


def size_request(spec: RouteSpec, body: dict[str, Any]) -> int | None:
    """The completion budget the request asks for (validated), as quotas reserve it."""
    if not spec.reserves_completion:
        return 0
    keys = ("max_output_tokens",) if spec.usage == "responses" else ("max_completion_tokens", "max_tokens")
    mt = None
    for k in keys:
        if body.get(k) is not None:
            mt = body[k]
            if spec.model_from == "form" and isinstance(mt, str) and mt.isdigit():
                mt = int(mt)
            if not isinstance(mt, int) or isinstance(mt, bool) or mt < 0:
                raise ApiError(400, f"'{k}' must be a non-negative integer.", param=k, code="invalid_type")
            break
    return mt


def form_stream(body: dict[str, Any]) -> bool:
    v = str(body.get("stream", "false")).strip().lower()
    if v not in ("true", "false", "1", "0", ""):
        raise ApiError(400, "'stream' must be true or false.", param="stream", code="invalid_type")
    return v in ("true", "1")


def take_usage(spec: RouteSpec, ctx: RequestContext, usage: Any) -> None:
    pt, ct = usage_tokens(spec.usage, usage)
    if pt is not None:
        ctx.prompt_tokens = pt
    if ct is not None:
        ctx.completion_tokens = ct


def settle_uncounted(spec: RouteSpec, ctx: RequestContext) -> None:
    """Routes whose tokens do not count (tokenize, retrieving a stored response) settle to zero."""
    if not spec.counts_tokens and ctx.status == 200:
        ctx.prompt_tokens = ctx.prompt_tokens or 0
        ctx.completion_tokens = 0


def remember_response(spec: RouteSpec, ctx: RequestContext, index: ResponseIndex | None, obj: Any) -> None:
    """Remember which replica holds a response the engine created (for GET/cancel by id)."""
    if index is None or not spec.records_affinity or ctx.endpoint is None or ctx.model is None:
        return
    rid = response_id_of(obj) if not isinstance(obj, str) else obj
    if rid:
        index.record(rid, ctx.model, ctx.endpoint, principal_key(ctx.principal))


def principal_key(p: Any) -> str | None:
    """Who a stored response belongs to: the caller's kind and subject (an API key id, a JWT subject)."""
    return None if p is None else str(p.id)
