"""The application factory: the only place that wires the gateway's parts together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from gateway.accesslog import AccessLog
from gateway.admission import build_admission_chain
from gateway.api import GatewayApi
from gateway.audit.adopt import WorkerFiles
from gateway.audit.config import AuditSettings
from gateway.auth import Authenticator
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.tokens import JwtVerifier
from gateway.errors import ApiError
from gateway.hooks import Observer
from gateway.metrics import GatewayMetrics, TelemetrySources
from gateway.metrics_server import MetricsServer
from gateway.proxy import ProxyEndpoint
from gateway.proxy.routes import PROXIED_ROUTES
from gateway.quota.metrics import QuotaMetrics
from gateway.responses_api import ResponseIndex
from gateway.routing.discovery import DnsDiscovery, DnsTarget, parse_upstreams
from gateway.routing.pool import EndpointPool, HealthChecker
from gateway.routing.router import Router
from gateway.settings import GatewaySettings
from gateway.state import Closer, GatewayState
from gateway.upstream import make_session

log = logging.getLogger("gateway")

DnsTargets = dict[str, tuple[EndpointPool, list[str], list[DnsTarget]]]


def create_app_from_env() -> Starlette:
    """Factory for each worker process: every worker builds its app from the same environment."""
    from gateway import logs
    from gateway.http_server import configure

    settings = GatewaySettings()
    logs.configure(settings.log_level)
    # This worker's connections: the request-head limits (gateway/http_server.py).
    lim = settings.limits
    configure(lim.max_header_bytes, lim.max_header_count, lim.header_timeout)
    return create_app(settings)


def check_workers(settings: GatewaySettings) -> str | None:
    """Why these settings cannot run with several worker processes, or None."""
    a = settings.audit
    if settings.workers > 1 and a.enabled and a.sink == "file" and "{pid}" not in a.path:
        # Several processes must never append to one hash-chained segment.
        return "with workers > 1, audit.path must contain {pid} (one audit file per worker)"
    return None


def _watch_key_file(keys: ApiKeyStore, interval: float) -> Closer:
    """Reload the API key file on SIGHUP and when its mtime changes; returns the closer that stops it."""
    loop = asyncio.get_running_loop()
    task: asyncio.Future[None] | None = None
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


def _pools(settings: GatewaySettings) -> tuple[dict[str, EndpointPool], DnsTargets]:
    pools: dict[str, EndpointPool] = {}
    dns_targets: DnsTargets = {}
    for m in settings.models:
        if m.base is not None:
            continue  # a LoRA adapter: served by its base model's pool
        static, dns = parse_upstreams(m.upstreams)
        pools[m.name] = EndpointPool.from_urls(m.name, static, settings.routing)
        if dns:
            dns_targets[m.name] = (pools[m.name], static, dns)
    return pools, dns_targets


def _audit_settings(audit: AuditSettings) -> AuditSettings:
    """This process's audit settings: ``{pid}`` in the path becomes the process id (a copy; never mutated)."""
    if "{pid}" not in audit.path:
        return audit
    copy: AuditSettings = audit.model_copy(update={"path": audit.path.replace("{pid}", str(os.getpid()))})
    return copy


def _lifespan(  # type: ignore[no-untyped-def]
    state: GatewayState,
    keys: ApiKeyStore,
    verifier: JwtVerifier | None,
    dns_targets: DnsTargets,
    worker_files: WorkerFiles | None,
):
    settings = state.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if state.audit is not None:
            if worker_files is not None:
                from gateway.audit.adopt import start_worker_audit

                # This worker's files under a lifetime lock; dead workers' files are adopted at start.
                release = await start_worker_audit(state.audit, worker_files)
            else:
                await state.audit.start()
            # Runs last at shutdown (after in-flight requests ended): drain, close the segment, archive.
            state.closers.append(state.audit.stop)
            if worker_files is not None:
                state.closers.append(release)
        if settings.metrics_port:
            ms = MetricsServer(
                state, settings.metrics_host or settings.host, settings.metrics_port, settings.workers > 1
            )
            try:
                await ms.start()
            except OSError as e:
                raise SystemExit(
                    f"llm-gateway: cannot serve metrics on port {settings.metrics_port}: {e}"
                ) from e
            state.closers.append(ms.stop)
        state.sessions = {m.name: make_session(m) for m in settings.models if m.base is None}
        health = state.health = HealthChecker(
            list(state.pools.values()),
            settings.health_interval,
            settings.health_timeout,
            settings.routing.unhealthy_after,
            api_keys={m.name: m.upstream_api_key for m in settings.models if m.base is None},
        )
        if dns_targets:
            # Resolve once before the first probe round so DNS-named replicas are probed with the rest.
            state.discovery = DnsDiscovery(dns_targets, settings.routing.dns_interval, on_added=health.probe)
        await health.start()
        if verifier is not None:
            await verifier.start()
            state.closers.append(verifier.close)
        if keys.keys_file:
            state.closers.append(_watch_key_file(keys, settings.auth.keys_file_poll_interval))
        if state.discovery is not None:
            await state.discovery.start()
        log.info("gateway ready", extra={"models": [m.name for m in settings.models], "api_keys": len(keys)})
        try:
            yield
        finally:
            if state.discovery is not None:
                await state.discovery.stop()
            await health.stop()
            for s in state.sessions.values():
                await s.close()
            for c in state.closers:
                await c()

    return lifespan


class GatewayApp(Starlette):
    """Starlette, with the proxied routes dispatched first by exact path: each is a plain ASGI endpoint that
    answers every error itself (OpenAI-shaped), so Starlette's router and its two exception middlewares add
    nothing to them but a few calls per request. Every other path goes through Starlette as before."""

    def __init__(self, *, direct: dict[str, ProxyEndpoint], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Our HTTP server (gateway/http_server.py) calls these itself, skipping __call__ below.
        self.direct_routes = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            endpoint = self.direct_routes.get(scope["path"])
            if endpoint is not None:
                try:
                    await endpoint(scope, receive, send)
                except Exception:
                    # What Starlette's ServerErrorMiddleware would do: an OpenAI-shaped 500 if the response
                    # has not started, then the error goes on to the server (which logs it).
                    log.exception("unhandled error")
                    with contextlib.suppress(Exception):
                        await _send_500(send)
                    raise
                return
        await super().__call__(scope, receive, send)


async def _send_500(send: Send) -> None:
    body = ApiError(500, "Internal gateway error.", code="internal_error").body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app(
    settings: GatewaySettings | None = None,
    *,
    observers: list[Observer] | None = None,
    worker_index: int = 0,
) -> Starlette:
    """The gateway as an ASGI app. ``settings`` is read, never changed; ``observers`` are called after the
    built-in ones (metrics, audit, tracing) once per request. ``worker_index`` (0..workers-1) is this
    process's place among the gateway's workers: it takes its share of the fair queue's per-replica budget."""
    settings = settings or GatewaySettings()
    keys = ApiKeyStore.from_settings(settings.api_keys, settings.api_keys_file)
    verifier = JwtVerifier.from_settings(settings.auth) if settings.auth.issuers else None
    auth = Authenticator(
        keys,
        enabled=settings.auth_enabled,
        token_verifier=verifier,
        max_credential_bytes=max(settings.auth.max_token_bytes, 1024),
    )
    pools, dns_targets = _pools(settings)
    metrics = GatewayMetrics.from_settings(settings)
    router = Router(settings.routing, settings.max_retries)
    audit = None
    worker_files = None
    if settings.audit.enabled:
        from gateway.audit.writer import AuditWriter

        if "{pid}" in settings.audit.path and settings.audit.sink == "file":
            from gateway.audit.adopt import WorkerFiles

            worker_files = WorkerFiles(settings.audit.path)
        audit = AuditWriter.from_settings(_audit_settings(settings.audit))
    fair = None
    if settings.fair_queue.enabled:
        from gateway.fairqueue.admission import FairQueueStep

        fair = FairQueueStep(
            settings.fair_queue, pools, metrics.registry, workers=settings.workers, worker_index=worker_index
        )
    # The admission chain, in the order requests meet it (gateway/admission/__init__.py).
    quota_stats = QuotaMetrics() if settings.quota.active else None
    chain, quota = build_admission_chain(settings.quota, auth, pools, quota_stats, audit, fair)
    state = GatewayState(
        settings=settings, auth=auth, pools=pools, router=router, admission=chain, metrics=metrics
    )
    if fair is not None:
        state.admission_waits = True
        state.closers.append(fair.close)
    state.observers.append(metrics)
    if settings.responses_index_size:
        state.responses = ResponseIndex(settings.responses_index_size)
    if settings.access_log:
        state.observers.append(AccessLog())
    if quota is not None:
        state.closers.append(quota.close)
    if audit is not None:
        state.audit = audit
        state.observers.append(audit)
    metrics.bind(
        TelemetrySources(
            pools=pools, router=router, quota=quota_stats, audit=audit, in_flight=lambda: state.in_flight
        )
    )
    if settings.tracing.enabled:
        from gateway.tracing import RequestTracer

        tracer = RequestTracer(settings.tracing)
        state.tracing = tracer
        state.observers.append(tracer)
        state.closers.append(tracer.close)
    state.observers.extend(observers or [])

    api = GatewayApi(state)
    endpoints = [(path, ProxyEndpoint(state, spec)) for path, spec in PROXIED_ROUTES]
    routes: list[BaseRoute] = [Route(path, endpoint) for path, endpoint in endpoints]
    # Paths with parameters ("/v1/responses/{response_id}") are Starlette's to match.
    direct = {path: endpoint for path, endpoint in endpoints if "{" not in path}
    routes.extend(api.routes())
    app = GatewayApp(
        direct=direct,
        routes=routes,
        lifespan=_lifespan(state, keys, verifier, dns_targets, worker_files),
        exception_handlers={HTTPException: api.http_exception, Exception: api.server_error},
    )
    # No trailing-slash redirects: Starlette builds their Location from the client's Host header (an open
    # redirect to any host); "/v1/models/" and friends are a plain 404 instead.
    app.router.redirect_slashes = False
    app.state.gateway = state
    return app
