"""``/metrics`` on its own port, away from the API.

The metrics name tenants (JWT claims included), per-tenant counts and replica URLs: nothing a caller of the
API should read. By default they are served here, on ``metrics_port`` (9091), a port the Helm chart's
NetworkPolicy opens to the monitoring namespace only. With ``metrics_port: 0`` they stay on the API port
behind ``Authorization: Bearer <metrics_token>`` (see ``gateway/app.py``).

A small aiohttp server in the gateway's event loop (aiohttp bounds request heads itself). With several
uvicorn workers each binds the port with ``SO_REUSEPORT`` and a scrape reaches one of them, as it did on
the API port.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("gateway.metrics")


def render(state: Any) -> bytes:
    """The text exposition of the app's registry (scrape-time series are read now, by its collector)."""
    return generate_latest(state.metrics.registry)


def token_ok(headers: list[tuple[bytes, bytes]], token: str) -> bool:
    """True when the only ``Authorization`` header is ``Bearer <token>`` (compared in constant time)."""
    values = [v for k, v in headers if k == b"authorization"]
    if len(values) != 1:
        return False
    scheme, _, cred = values[0].partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(cred.strip(), token.encode())


class MetricsServer:
    def __init__(self, state: Any, host: str, port: int, reuse_port: bool = False) -> None:
        self.state = state
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = render(self.state)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=self.reuse_port or None)
        await site.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
