"""The application factory: the only place that wires the gateway's parts together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.accesslog import AccessLog
from gateway.auth import Authenticator
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.tokens import JwtVerifier
from gateway.context import RequestContext, new_request_id
from gateway.errors import ApiError
from gateway.hooks import Admission, NoAdmissionControl, Observer
from gateway.metrics import GatewayMetrics
from gateway.metrics_server import MetricsServer, render, token_ok
from gateway.proxy import ProxyEndpoint
from gateway.quota.admission import build_admission
from gateway.responses_api import ResponseIndex
from gateway.routes import PROXIED_ROUTES, RouteSpec
from gateway.routing.catalog import merged
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
    # The AuditWriter when audit is enabled (queue_depth() for metrics).
    audit: Any = None
    # gateway.tracing.RequestTracer when tracing is enabled (off by default), else None.
    tracing: Any = None
    # Set when the drain deadline passed: streams still running end with an error event (gateway/drain.py).
    drain_expired: bool = False
    # Where stored Responses API objects live (GET/cancel by id go to that replica).
    responses: ResponseIndex | None = None


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


def _context(request: Request, route: str) -> RequestContext:
    rid = request.headers.get("x-request-id")
    client = request.scope.get("client")
    return RequestContext(rid[:128] if rid else new_request_id(), route, request.method, client[0] if client else None)


async def _finish(state: GatewayState, ctx: RequestContext, resp: Response, e: ApiError | None = None) -> Response:
    """Non-proxied API routes (model listing) go through the observers too: one audit record each."""
    ctx.finished = time.perf_counter()
    ctx.status = resp.status_code
    ctx.bytes_out = len(resp.body)
    if e is not None:
        ctx.decision = {401: "unauthenticated", 403: "forbidden", 404: "not_found"}.get(
            e.status, "invalid_request" if e.status < 500 else "upstream_error"
        )
        ctx.reason, ctx.error_message = e.reason, e.message
    resp.headers["x-request-id"] = ctx.request_id
    for obs in state.observers:
        try:
            await obs.on_request_end(ctx)
        except Exception:
            log.exception("observer %s failed", type(obs).__name__, extra={"request_id": ctx.request_id})
    return resp


def model_entry(state: GatewayState, m) -> dict[str, Any] | None:
    """A model as /v1/models lists it: the gateway's fields plus what its engines report (cached from the
    health probes: no engine round trip per request). An adapter is listed only while an engine serves it."""
    out: dict[str, Any] = {"id": m.name, "object": "model", "created": int(state.started), "owned_by": m.owned_by}
    pool = state.pools.get(state.settings.pool_name(m.name))
    view = merged(pool.endpoints) if pool is not None else None
    engine_name = m.upstream_model or m.name
    if m.base is not None:
        if view is None or not view.serves_model(engine_name):
            return None
        out["parent"] = m.base
    if view is not None and engine_name in view.models:
        reported = view.models[engine_name]
        if isinstance(reported.get("max_model_len"), int):
            out["max_model_len"] = reported["max_model_len"]
        elif m.base is not None:
            base = view.models.get(state.settings.model(m.base).upstream_model or m.base, {})
            if isinstance(base.get("max_model_len"), int):
                out["max_model_len"] = base["max_model_len"]
    return out


async def list_models(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    ctx = _context(request, "/v1/models")
    try:
        principal = ctx.principal = await state.auth.authenticate(request.scope["headers"])
    except ApiError as e:
        return await _finish(state, ctx, error_response(e), e)
    data = [e for m in state.settings.models if principal.may_use(m.name) and (e := model_entry(state, m)) is not None]
    return await _finish(state, ctx, JSONResponse({"object": "list", "data": data}))


async def get_model(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    ctx = _context(request, "/v1/models/{model}")
    ctx.extra["url_path"] = request.url.path[:512]
    try:
        ctx.principal = await state.auth.authenticate(request.scope["headers"])
    except ApiError as e:
        return await _finish(state, ctx, error_response(e), e)
    name = ctx.model = request.path_params["model"]
    m = state.settings.model(name)
    entry = model_entry(state, m) if m is not None else None
    if entry is None:
        e = ApiError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found")
        return await _finish(state, ctx, error_response(e), e)
    try:
        state.auth.authorize(ctx.principal, name)
    except ApiError as e:
        return await _finish(state, ctx, error_response(e), e)
    return await _finish(state, ctx, JSONResponse(entry))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    models = {name: pool.any_healthy for name, pool in state.pools.items()}
    # require=all (default): every model has a healthy replica. require=any: at least one does; Kubernetes
    # readiness uses it, so one model's outage does not take the gateway out of service for all the others.
    require = request.query_params.get("require", "all")
    if require not in ("all", "any"):
        return error_response(ApiError(400, "'require' must be 'all' or 'any'.", param="require", code="invalid_value"))
    healthy = all(models.values()) if require == "all" else any(models.values())
    ready = not state.draining and bool(models) and healthy
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "draining": state.draining}
    # Model names only for a caller with a credential (the ones it may use); probes need just the status.
    if any(k in (b"authorization", b"api-key", b"x-api-key") for k, _ in request.scope["headers"]):
        try:
            principal = await state.auth.authenticate(request.scope["headers"])
        except ApiError as e:
            return error_response(e)
        body["models"] = {m: ok for m, ok in models.items() if principal.may_use(m)}
    return JSONResponse(body, status_code=200 if ready else 503)


async def metrics_endpoint(request: Request) -> Response:
    """``/metrics`` on the API port, only with ``metrics_port: 0``: it then needs the metrics token."""
    state: GatewayState = request.app.state.gateway
    token = state.settings.metrics_token
    if not token or not token_ok(request.scope["headers"], token):
        e = ApiError(
            401,
            "The metrics need 'Authorization: Bearer <metrics token>'.",
            code="invalid_api_key",
            headers={"www-authenticate": 'Bearer realm="metrics"'},
        )
        return error_response(e)
    return Response(render(state), media_type=CONTENT_TYPE_LATEST)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        e = ApiError(404, f"Unknown route {request.method} {request.url.path}.", code="unknown_route")
    elif exc.status_code == 405:
        e = ApiError(405, f"Method {request.method} not allowed on {request.url.path}.", code="method_not_allowed")
    else:
        e = ApiError(exc.status_code, str(exc.detail))
    # Recorded too (scanners, wrong paths); a fixed route label keeps metrics' label set bounded.
    ctx = _context(request, "(unmatched)")
    ctx.extra["url_path"] = request.url.path[:512]
    return await _finish(request.app.state.gateway, ctx, error_response(e), e)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error")
    return error_response(ApiError(500, "Internal gateway error.", code="internal_error"))


def create_app_from_env() -> Starlette:
    """Factory for uvicorn's multi-worker mode: every worker builds its app from the same environment."""
    from gateway import logs
    from gateway.http_server import configure

    settings = GatewaySettings()
    logs.configure(settings.log_level)
    # This worker's connections: the request-head limits (gateway/http_server.py).
    lim = settings.limits
    configure(lim.max_header_bytes, lim.max_header_count, lim.header_timeout)
    if settings.audit.enabled and settings.audit.sink == "file" and "{pid}" not in settings.audit.path:
        # Several processes must never append to one hash-chained segment.
        raise SystemExit("llm-gateway: with workers > 1, audit.path must contain {pid} (one audit file per worker)")
    return create_app(settings)


def _watch_key_file(keys: ApiKeyStore, interval: float):
    """Reload the API key file on SIGHUP and when its mtime changes; returns the closer that stops it."""
    loop = asyncio.get_running_loop()
    task = None
    if interval > 0:

        async def poll() -> None:
            while True:
                await asyncio.sleep(interval)
                keys.reload_if_changed()

        task = asyncio.ensure_future(poll())
    hup = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, keys.reload_if_changed, True)
        hup = True

    async def stop() -> None:
        if task is not None:
            task.cancel()
        if hup:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGHUP)

    return stop


def create_app(
    settings: GatewaySettings | None = None,
    *,
    admission: Admission | None = None,
    observers: list[Observer] | None = None,
) -> Starlette:
    settings = settings or GatewaySettings()
    keys = ApiKeyStore.from_settings(settings.api_keys, settings.api_keys_file)
    verifier = JwtVerifier.from_settings(settings.auth) if settings.auth.issuers else None
    auth = Authenticator(
        keys,
        enabled=settings.auth_enabled,
        token_verifier=verifier,
        max_credential_bytes=max(settings.auth.max_token_bytes, 1024),
    )
    pools: dict[str, EndpointPool] = {}
    dns_targets = {}
    for m in settings.models:
        if m.base is not None:
            continue  # an adapter: served by its base model's pool
        static, dns = parse_upstreams(m.upstreams)
        pools[m.name] = EndpointPool.from_urls(m.name, static, settings.routing)
        if dns:
            dns_targets[m.name] = (pools[m.name], static, dns)
    metrics = GatewayMetrics.from_settings(settings)
    router = Router(settings.routing, settings.max_retries)
    metrics.registry.register(RoutingCollector(pools, router))
    closers = []
    if admission is None:
        quota = build_admission(settings.quota, pools, metrics.registry)
        if quota is not None:
            admission = quota
            closers.append(quota.close)
    state = GatewayState(
        settings=settings,
        auth=auth,
        pools=pools,
        router=router,
        admission=admission or NoAdmissionControl(),
        metrics=metrics,
        observers=[metrics, *([AccessLog()] if settings.access_log else []), *(observers or [])],
        closers=closers,
        responses=ResponseIndex(settings.responses_index_size) if settings.responses_index_size else None,
    )
    worker_files = None
    if settings.audit.enabled:
        from gateway.audit.writer import AuditGate, AuditWriter

        if "{pid}" in settings.audit.path:
            if settings.audit.sink == "file":
                from gateway.audit.adopt import WorkerFiles

                # This worker's files under a lifetime lock; dead workers' files are adopted at start.
                worker_files = WorkerFiles(settings.audit.path)
            settings.audit = settings.audit.model_copy(update={"path": settings.audit.path.replace("{pid}", str(os.getpid()))})

        state.audit = AuditWriter.from_settings(settings.audit)
        state.observers.append(state.audit)
        # Back-pressure: while the audit queue is full, new requests wait or get 503 (see gateway/audit/writer.py).
        state.admission = AuditGate(state.admission, state.audit)
    metrics.bind_state(state)
    if settings.tracing.enabled:
        from gateway.tracing import RequestTracer

        state.tracing = RequestTracer(settings.tracing)
        state.observers.append(state.tracing)
        state.closers.append(state.tracing.close)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if state.audit is not None:
            if worker_files is not None:
                from gateway.audit.adopt import start_worker_audit

                release = await start_worker_audit(state.audit, worker_files)
            else:
                await state.audit.start()
            # Runs last at shutdown (after in-flight requests ended): drain, close the segment, archive.
            state.closers.append(state.audit.stop)
            if worker_files is not None:
                state.closers.append(release)
        state.sessions = {m.name: make_session(m) for m in settings.models if m.base is None}
        state.health = HealthChecker(
            list(pools.values()),
            settings.health_interval,
            settings.health_timeout,
            settings.routing.unhealthy_after,
            api_keys={m.name: m.upstream_api_key for m in settings.models if m.base is None},
        )
        if dns_targets:
            # Resolve once before the first probe round so DNS-named replicas are probed with the rest.
            state.discovery = DnsDiscovery(dns_targets, settings.routing.dns_interval, on_added=state.health.probe)
        await state.health.start()
        if verifier is not None:
            await verifier.start()
            state.closers.append(verifier.close)
        if keys.keys_file:
            state.closers.append(_watch_key_file(keys, settings.auth.keys_file_poll_interval))
        if state.discovery is not None:
            await state.discovery.start()
        if settings.metrics_port:
            ms = MetricsServer(state, settings.metrics_host or settings.host, settings.metrics_port, settings.workers > 1)
            try:
                await ms.start()
            except OSError as e:
                raise SystemExit(f"llm-gateway: cannot serve metrics on port {settings.metrics_port}: {e}") from e
            state.closers.append(ms.stop)
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

    generate = RouteSpec(
        "/v1/completions",
        "/generate",
        request_transform=_generate_request,
        response_transform=_generate_response,
        text_fields=("prompt",),
        feature="generate",
    )
    routes = [
        *(Route(spec.public_path, ProxyEndpoint(spec)) for spec in PROXIED_ROUTES),
        Route("/generate", ProxyEndpoint(generate)),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    if not settings.metrics_port:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _server_error},
    )
    # No trailing-slash redirects: Starlette builds their Location from the client's Host header (an open
    # redirect to any host); "/v1/models/" and friends are a plain 404 instead.
    app.router.redirect_slashes = False
    app.state.gateway = state
    return app
