#!/usr/bin/env python3
"""Server CPU per request of the HTTP/1.1 protocol choices for the gateway's port.

uvicorn + httptools has no limit on request heads; h11 has one (``h11_max_incomplete_event_size``) but parses
in Python; ``gateway.http_server.HttpProtocol`` (ours, on httptools' parser) has the limits and writes a known
response in one write with a content-length (the app here sends none, like the gateway). Each runs in its own
uvicorn process serving a trivial ASGI app; a client sends ``--requests`` keep-alive requests with a realistic
head (~600 bytes, 12 headers) over 8 connections; the server's CPU time (utime+stime from /proc) divided by
the request count is the cost. CPU time, not wall time: the box is shared.

    python scripts/bench_http_protocol.py [--requests 20000]

Writes results/bench_http_protocol.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SERVER = r"""
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})
kind, port = sys.argv[1], int(sys.argv[2])
opts = dict(host="127.0.0.1", port=port, log_level="error", access_log=False, lifespan="off")
if kind == "httptools":
    uvicorn.run(app, http="httptools", **opts)
elif kind == "h11":
    uvicorn.run(app, http="h11", h11_max_incomplete_event_size=64 * 1024, **opts)
else:
    from gateway.http_server import configure
    configure(64 * 1024, 100, 10.0)
    uvicorn.run(app, http="gateway.http_server:HttpProtocol", **opts)
"""

HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: llm.example.com\r\nUser-Agent: OpenAI/Python 1.54.0\r\n"
    b"Accept: application/json\r\nAccept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer sk-llm-"
    + b"x"
    * 43
    + b"\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.0\r\n"
    b"X-Stainless-Os: Linux\r\nX-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\n"
    b"X-Request-Id: 0f3c5d9e-8b1a-4c7e-9d2f-6a5b4c3d2e1f\r\nContent-Length: 60\r\n\r\n"
    b'{"model":"m","messages":[{"role":"user","content":"hi"}]}   '
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(port: int, n: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    buf = b""
    for _ in range(n):
        s.sendall(HEAD)
        while b'{"ok":true}' not in buf:
            buf += s.recv(65536)
        buf = buf[buf.index(b'{"ok":true}') + 11 :]
    s.close()


def measure(kind: str, requests: int) -> float:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-c", SERVER, kind, str(port)], env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client(port, 200)  # warm up
        before = cpu_seconds(p.pid)
        per = requests // 8
        threads = [threading.Thread(target=client, args=(port, per)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return (cpu_seconds(p.pid) - before) / (per * 8) * 1e6
    finally:
        p.terminate()
        p.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    kinds = ("httptools", "gateway", "h11")
    results = {k: round(min(measure(k, args.requests) for _ in range(args.rounds)), 1) for k in kinds}
    out = REPO / "results"
    out.mkdir(exist_ok=True)
    doc = {
        "server_cpu_us_per_request": results,
        "requests": args.requests,
        "command": "python scripts/bench_http_protocol.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (shared box: noisy)",
    }
    (out / "bench_http_protocol.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [
        "# HTTP/1.1 protocol on the API port: server CPU per request",
        "",
        "| protocol | head limits | µs CPU per request (best of rounds) |",
        "|---|---|---|",
        f"| uvicorn httptools | none | {results['httptools']} |",
        f"| gateway HttpProtocol (ours, httptools parser) | 64 KiB, 100 headers, 10 s | {results['gateway']} |",
        f"| uvicorn h11 | 64 KiB (h11_max_incomplete_event_size) | {results['h11']} |",
        "",
        f"`{doc['command']}`; {doc['machine']}.",
    ]
    (out / "bench_http_protocol.md").write_text("\n".join(md) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
