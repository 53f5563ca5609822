"""The application factory: the only place that wires the gateway's parts together."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.auth import Authenticator
from gateway.auth.apikeys import ApiKeyStore
from gateway.errors import ApiError
from gateway.hooks import Admission, NoAdmissionControl, Observer
from gateway.metrics import GatewayMetrics
from gateway.proxy import ProxyEndpoint
from gateway.routing.discovery import DnsDiscovery, parse_upstreams
from gateway.routing.pool import EndpointPool, HealthChecker
from gateway.routing.router import Router
from gateway.routing.telemetry import RoutingCollector
from gateway.settings import GatewaySettings
from gateway.upstream import make_session

log = logging.getLogger("gateway")


@dataclass
class GatewayState:
    """Shared objects of one app, created in the factory/lifespan and kept on ``app.state.gateway``."""

    settings: GatewaySettings
    auth: Authenticator
    pools: dict[str, EndpointPool]
    router: Router
    admission: Admission
    metrics: GatewayMetrics
    observers: list[Observer] = field(default_factory=list)
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    health: HealthChecker | None = None
    discovery: DnsDiscovery | None = None
    in_flight: int = 0
    draining: bool = False
    started: float = field(default_factory=time.time)
    closers: list[Any] = field(default_factory=list)
    # Set when the drain deadline passed: streams still running end with an error event (gateway/drain.py).
    drain_expired: bool = False


def error_response(e: ApiError) -> Response:
    return Response(e.body(), status_code=e.status, media_type="application/json", headers=e.headers)


def _generate_request(body: dict[str, Any], state: GatewayState) -> dict[str, Any]:
    """The seed's ``POST /generate {"prompt", "max_tokens"}`` as a completions request."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string.", param="prompt", code="invalid_type")
    model = body.get("model")
    if model is None:
        if not state.settings.models:
            raise ApiError(404, "No model is configured.", code="model_not_found")
        model = state.settings.models[0].name
    out: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": body.get("max_tokens", 128), "stream": False}
    for k in ("temperature", "top_p", "stop", "seed"):
        if k in body:
            out[k] = body[k]
    return out


def _generate_response(obj: dict[str, Any]) -> dict[str, Any]:
    choices = obj.get("choices") or [{}]
    return {"response": choices[0].get("text", ""), "model": obj.get("model"), "usage": obj.get("usage")}


async def list_models(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    try:
        principal = await state.auth.authenticate(request.scope["headers"])
    except ApiError as e:
        return error_response(e)
    data = [
        {"id": m.name, "object": "model", "created": int(state.started), "owned_by": m.owned_by}
        for m in state.settings.models
        if principal.may_use(m.name)
    ]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    try:
        principal = await state.auth.authenticate(request.scope["headers"])
    except ApiError as e:
        return error_response(e)
    name = request.path_params["model"]
    m = state.settings.model(name)
    if m is None or not principal.may_use(name):
        return error_response(ApiError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found"))
    return JSONResponse({"id": m.name, "object": "model", "created": int(state.started), "owned_by": m.owned_by})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    models = {name: pool.any_healthy for name, pool in state.pools.items()}
    ready = not state.draining and bool(models) and all(models.values())
    body = {"status": "ready" if ready else "not_ready", "draining": state.draining, "models": models}
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    state.metrics.in_flight.set(state.in_flight)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        e = ApiError(404, f"Unknown route {request.method} {request.url.path}.", code="unknown_route")
    elif exc.status_code == 405:
        e = ApiError(405, f"Method {request.method} not allowed on {request.url.path}.", code="method_not_allowed")
    else:
        e = ApiError(exc.status_code, str(exc.detail))
    return error_response(e)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error")
    return error_response(ApiError(500, "Internal gateway error.", code="internal_error"))


def create_app(
    settings: GatewaySettings | None = None,
    *,
    admission: Admission | None = None,
    observers: list[Observer] | None = None,
) -> Starlette:
    settings = settings or GatewaySettings()
    keys = ApiKeyStore.from_settings(settings.api_keys, settings.api_keys_file)
    auth = Authenticator(keys, enabled=settings.auth_enabled)
    pools: dict[str, EndpointPool] = {}
    dns_targets = {}
    for m in settings.models:
        static, dns = parse_upstreams(m.upstreams)
        pools[m.name] = EndpointPool.from_urls(m.name, static, settings.routing)
        if dns:
            dns_targets[m.name] = (pools[m.name], static, dns)
    metrics = GatewayMetrics()
    router = Router(settings.routing, settings.max_retries)
    metrics.registry.register(RoutingCollector(pools, router))
    state = GatewayState(
        settings=settings,
        auth=auth,
        pools=pools,
        router=router,
        admission=admission or NoAdmissionControl(),
        metrics=metrics,
        observers=[metrics, *(observers or [])],
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state.sessions = {m.name: make_session(m) for m in settings.models}
        state.health = HealthChecker(
            list(pools.values()), settings.health_interval, settings.health_timeout, settings.routing.unhealthy_after
        )
        if dns_targets:
            # Resolve once before the first probe round so DNS-named replicas are probed with the rest.
            state.discovery = DnsDiscovery(dns_targets, settings.routing.dns_interval, on_added=state.health.probe)
        await state.health.start()
        if state.discovery is not None:
            await state.discovery.start()
        log.info("gateway ready", extra={"models": [m.name for m in settings.models], "api_keys": len(keys)})
        try:
            yield
        finally:
            if state.discovery is not None:
                await state.discovery.stop()
            await state.health.stop()
            for s in state.sessions.values():
                await s.close()
            for c in state.closers:
                await c()

    routes = [
        Route("/v1/chat/completions", ProxyEndpoint("/v1/chat/completions")),
        Route("/v1/completions", ProxyEndpoint("/v1/completions")),
        Route("/v1/embeddings", ProxyEndpoint("/v1/embeddings", streamable=False)),
        Route(
            "/generate",
            ProxyEndpoint(
                "/v1/completions",
                streamable=False,
                request_transform=_generate_request,
                response_transform=_generate_response,
                route_name="/generate",
            ),
        ),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _server_error},
    )
    app.state.gateway = state
    return app
