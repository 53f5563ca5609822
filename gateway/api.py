"""The gateway's own routes (not proxied): model listing, liveness, readiness, metrics, unknown routes.

Model listing goes through the same request context and observers as proxied requests (one audit record
each); unmatched routes are recorded too, under a fixed route label so metric labels stay bounded.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.context import RequestContext, response_request_id
from gateway.errors import ApiError
from gateway.metrics_server import render, token_ok
from gateway.proxy.endpoint import observe, request_context
from gateway.routing.catalog import merged
from gateway.settings import ModelConfig
from gateway.state import GatewayState

log = logging.getLogger("gateway")


def error_response(e: ApiError) -> Response:
    return Response(e.body(), status_code=e.status, media_type="application/json", headers=e.headers)


def _context(request: Request, route: str) -> RequestContext:
    return request_context(request.scope["headers"], route, request.method, request.scope.get("client"))


class GatewayApi:
    """The non-proxied handlers, bound to the app's state."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def _finish(self, ctx: RequestContext, resp: Response, e: ApiError | None = None) -> Response:
        ctx.status = resp.status_code
        ctx.bytes_out = len(resp.body)
        if e is not None:
            ctx.end(e)
            ctx.error_message = e.message
        resp.headers["x-request-id"] = response_request_id(ctx).decode()
        await observe(self.state.observers, ctx)
        return resp

    async def _error(self, ctx: RequestContext, e: ApiError) -> Response:
        return await self._finish(ctx, error_response(e), e)

    def _model_card(self, m: ModelConfig) -> dict[str, Any] | None:
        """A model as /v1/models lists it: the gateway's fields plus what its engines report (cached from the
        health probes: no engine round trip per request). An adapter is listed only while an engine serves it."""
        state = self.state
        out: dict[str, Any] = {
            "id": m.name,
            "object": "model",
            "created": int(state.started),
            "owned_by": m.owned_by,
        }
        pool = state.pools.get(state.settings.pool_name(m.name))
        view = merged(pool.endpoints) if pool is not None else None
        engine_name = m.upstream_model or m.name
        if m.base is not None:
            if view is None or not view.serves_model(engine_name):
                return None
            out["parent"] = m.base
        if view is not None:
            reported = view.models.get(engine_name, {})
            if not isinstance(reported.get("max_model_len"), int) and m.base is not None:
                base = state.settings.model(m.base)
                reported = view.models.get((base.upstream_model if base else None) or m.base, {})
            if isinstance(reported.get("max_model_len"), int):
                out["max_model_len"] = reported["max_model_len"]
        return out

    async def list_models(self, request: Request) -> Response:
        ctx = _context(request, "/v1/models")
        try:
            principal = ctx.principal = await self.state.auth.authenticate(request.scope["headers"])
        except ApiError as e:
            return await self._error(ctx, e)
        models = self.state.settings.models
        data = [c for m in models if principal.may_use(m.name) and (c := self._model_card(m)) is not None]
        return await self._finish(ctx, JSONResponse({"object": "list", "data": data}))

    async def get_model(self, request: Request) -> Response:
        ctx = _context(request, "/v1/models/{model}")
        ctx.extra["url_path"] = request.url.path[:512]
        name = request.path_params["model"]
        try:
            principal = ctx.principal = await self.state.auth.authenticate(request.scope["headers"])
            ctx.model = name
            m = self.state.settings.model(name)
            card = self._model_card(m) if m is not None else None
            if card is None:
                raise ApiError(
                    404, f"The model '{name}' does not exist.", param="model", code="model_not_found"
                )
            self.state.auth.authorize(principal, name)
        except ApiError as e:
            return await self._error(ctx, e)
        return await self._finish(ctx, JSONResponse(card))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        state = self.state
        models = {name: pool.any_healthy for name, pool in state.pools.items()}
        # require=all (default): every model has a healthy replica. require=any: at least one does; Kubernetes
        # readiness uses it, so one model's outage does not take the gateway out of service for all the others.
        require = request.query_params.get("require", "all")
        if require not in ("all", "any"):
            return error_response(
                ApiError(400, "'require' must be 'all' or 'any'.", param="require", code="invalid_value")
            )
        healthy = all(models.values()) if require == "all" else any(models.values())
        ready = not state.draining and bool(models) and healthy
        body: dict[str, object] = {"status": "ready" if ready else "not_ready", "draining": state.draining}
        # Model names only for a caller with a credential (the ones it may use); probes need just the status.
        if any(k in (b"authorization", b"api-key", b"x-api-key") for k, _ in request.scope["headers"]):
            try:
                principal = await state.auth.authenticate(request.scope["headers"])
            except ApiError as e:
                return error_response(e)
            body["models"] = {m: ok for m, ok in models.items() if principal.may_use(m)}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        """``/metrics`` on the API port, only with ``metrics_port: 0``: it then needs the metrics token."""
        token = self.state.settings.metrics_token
        if not token or not token_ok(request.scope["headers"], token):
            e = ApiError(
                401,
                "The metrics need 'Authorization: Bearer <metrics token>'.",
                code="invalid_api_key",
                headers={"www-authenticate": 'Bearer realm="metrics"'},
            )
            return error_response(e)
        return Response(render(self.state), media_type=CONTENT_TYPE_LATEST)

    async def http_exception(self, request: Request, exc: Exception) -> Response:
        status, detail = (
            (exc.status_code, str(exc.detail))
            if isinstance(exc, HTTPException)
            else (500, "Internal gateway error.")
        )
        if status == 404:
            e = ApiError(404, f"Unknown route {request.method} {request.url.path}.", code="unknown_route")
        elif status == 405:
            e = ApiError(
                405, f"Method {request.method} not allowed on {request.url.path}.", code="method_not_allowed"
            )
        else:
            e = ApiError(status, detail)
        # Recorded too (scanners, wrong paths); a fixed route label keeps metrics' label set bounded.
        ctx = _context(request, "(unmatched)")
        ctx.extra["url_path"] = request.url.path[:512]
        return await self._error(ctx, e)

    async def server_error(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(ApiError(500, "Internal gateway error.", code="internal_error"))

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]
        if not self.state.settings.metrics_port:
            routes.append(Route("/metrics", self.metrics, methods=["GET"]))
        return routes
