#!/usr/bin/env python3
"""Client CPU per request of the hot path's upstream client: aiohttp (with the settings the gateway used)
against ``gateway.upstream`` (our HTTP/1.1 keep-alive client on httptools).

A raw asyncio HTTP/1.1 server in another process answers at once: an OpenAI-sized JSON body with
Content-Length, or a chunked SSE stream of 16 events + [DONE]. The client process sends ``--requests``
POSTs over ``--connections`` keep-alive connections under uvloop, reading each body whole (JSON) or chunk by
chunk (SSE), each request bounded by a first-byte timeout as the proxy does. The cost is the client
process's CPU time divided by the request count (CPU time, not wall time: the box is shared); clients
alternate, twice each, and the lower of the two runs counts.

    python scripts/bench_upstream_client.py [--requests 20000] [--connections 16]

Writes results/bench_upstream_client.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.upstream import UpstreamSession  # noqa: E402

SERVER = r"""
import asyncio, sys, uvloop
BODY = (b'{"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"Hello there, how can I help?"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}')
EVENTS = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i for i in range(16)]
EVENTS.append(b"data: [DONE]\n\n")
JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
SSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
       + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n")

class Conn(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf = t, b""
    def data_received(self, d):
        self.buf += d
        while (i := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:i].decode("latin-1")
            n = 0
            for line in head.split("\r\n"):
                if line.lower().startswith("content-length:"):
                    n = int(line.split(":")[1])
            if len(self.buf) < i + 4 + n:
                return
            self.buf = self.buf[i + 4 + n:]
            self.t.write(SSE if " /sse " in head else JSON)

async def main():
    await asyncio.get_running_loop().create_server(Conn, "127.0.0.1", int(sys.argv[1]))
    await asyncio.sleep(3600)
uvloop.run(main())
"""

HEADERS = {"content-type": "application/json", "x-request-id": "req-0123456789abcdef01234567"}
BODY = b'{"model":"m","messages":[{"role":"user","content":"Hello"}],"max_tokens":16}'

Run = Callable[[str, int, int, bool], Awaitable[None]]


async def _spread(one: Callable[[], Awaitable[None]], n: int, conc: int) -> None:
    left = [n]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await one()

    await asyncio.gather(*[worker() for _ in range(conc)])


async def run_ours(url: str, n: int, conc: int, sse: bool) -> None:
    s = UpstreamSession(max_connections=1024, keepalive_timeout=4.0, connect_timeout=5.0, pool_timeout=30.0)
    loop = asyncio.get_running_loop()

    async def one() -> None:
        r = await s.request("POST", url, BODY, HEADERS, loop.time() + 60)
        try:
            if sse:
                while await r.readany():
                    pass
            else:
                await r.read()
        finally:
            r.close()

    await _spread(one, n, conc)
    await s.close()


async def run_aiohttp(url: str, n: int, conc: int, sse: bool) -> None:
    # The connector and timeouts the gateway configured before (limit, keep-alive, connect = pool + connect).
    connector = aiohttp.TCPConnector(
        limit=1024, limit_per_host=1024, keepalive_timeout=4.0, enable_cleanup_closed=True, ttl_dns_cache=10
    )
    s = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=35.0, sock_connect=5.0, sock_read=None),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        raise_for_status=False,
    )

    async def one() -> None:
        async with asyncio.timeout(60):
            r = await s.request("POST", url, data=BODY, headers=HEADERS)
            try:
                if sse:
                    while await r.content.readany():
                        pass
                else:
                    await r.read()
            finally:
                r.close()

    await _spread(one, n, conc)
    await s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("bench_upstream_client: the test server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    clients: dict[str, Run] = {"aiohttp": run_aiohttp, "ours": run_ours}
    rows: list[dict[str, object]] = []
    try:
        wait_port(port)
        for mode in ("json", "sse"):
            url = f"http://127.0.0.1:{port}/{mode}"
            best: dict[str, tuple[float, float]] = {}
            for name in [*clients, *clients]:
                uvloop.run(clients[name](url, 500, args.connections, mode == "sse"))  # warm up
                c0, w0 = time.process_time(), time.perf_counter()
                uvloop.run(clients[name](url, args.requests, args.connections, mode == "sse"))
                cpu_us = 1e6 * (time.process_time() - c0) / args.requests
                rps = args.requests / (time.perf_counter() - w0)
                if name not in best or cpu_us < best[name][0]:
                    best[name] = (cpu_us, rps)
            for name, (cpu_us, rps) in best.items():
                rows.append(
                    {
                        "mode": mode,
                        "client": name,
                        "cpu_us_per_request": round(cpu_us, 1),
                        "req_per_s": round(rps),
                    }
                )
                print(f"{mode:4} {name:8} {cpu_us:7.1f} µs CPU/request  {rps:8.0f} req/s", flush=True)
    finally:
        srv.kill()
        srv.wait()
    out = {
        "what": "upstream client CPU per request (client process only), instant local server",
        "requests": args.requests,
        "connections": args.connections,
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "rows": rows,
    }
    res = REPO / "results"
    res.mkdir(exist_ok=True)
    (res / "bench_upstream_client.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Upstream client: CPU per request",
        "",
        f"`python scripts/bench_upstream_client.py --requests {args.requests} --connections {args.connections}`"
        f" ({out['machine']}; shared machine, CPU time of the client process only).",
        "",
        "| body | client | CPU µs/request | req/s |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['client']} | {r['cpu_us_per_request']} | {r['req_per_s']} |")
    (res / "bench_upstream_client.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
