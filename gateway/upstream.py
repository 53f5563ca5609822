"""The one long-lived HTTP client per upstream pool.

aiohttp on the hot path: measured at 0.21 ms CPU per proxied request from a raw ASGI endpoint, against
2.2 ms for httpx (see the gateway-core issue note and scripts/bench_overhead.py). This module is the only
place that knows which client library carries the bytes.
"""

from __future__ import annotations

import aiohttp

from gateway.settings import ModelConfig, UpstreamTimeouts


def client_timeout(t: UpstreamTimeouts) -> aiohttp.ClientTimeout:
    # aiohttp owns the connection phases: `connect` covers waiting for a pooled connection plus
    # establishing it, `sock_connect` the TCP connect alone. Time to first byte, the idle gap between
    # chunks and the total are enforced by the proxy per phase (asyncio timeouts), because aiohttp's
    # `sock_read` would be one number for both the first byte and every later gap.
    return aiohttp.ClientTimeout(
        total=None,
        connect=t.pool + t.connect,
        sock_connect=t.connect,
        sock_read=None,
    )


def make_session(cfg: ModelConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=cfg.max_connections,
        limit_per_host=cfg.max_connections,
        # Shorter than the engine's own idle timeout (uvicorn's default is 5 s): reusing a connection the
        # server is closing at that moment fails with ServerDisconnectedError (seen on the H200 run).
        keepalive_timeout=cfg.keepalive_timeout,
        enable_cleanup_closed=True,
        ttl_dns_cache=10,
    )
    basic = cfg.upstream_basic_auth
    return aiohttp.ClientSession(
        connector=connector,
        # From user:password in the upstream URLs, which keep only host and port (settings.ModelConfig).
        auth=aiohttp.BasicAuth(*basic) if basic else None,
        timeout=client_timeout(cfg.timeouts),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        raise_for_status=False,
    )
