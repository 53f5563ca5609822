#!/usr/bin/env python3
"""A simulated OpenAI-compatible upstream, for fault injection and for measuring the gateway's own overhead.

Never the only test of a feature: real behaviour is tested against a real vLLM engine.

Modes (``--mode``): ``normal`` (answers instantly; streams ``--chunks`` small SSE events like vLLM does),
``hang`` (accepts, never answers POSTs; /health still answers), ``slow`` (waits ``--delay`` s before the first
byte), ``error`` (HTTP 500 with an OpenAI-shaped body), ``drop`` (streams a few events then drops the connection).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


def _chunk(i: int, model: str) -> bytes:
    obj = {
        "id": "cmpl-sim",
        "object": "text_completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "text": f" t{i}", "logprobs": None, "finish_reason": None}],
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def make_app(mode: str, chunks: int, delay: float, chunk_delay: float) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(request: web.Request) -> web.Response:
        waiting = request.app["waiting"]
        return web.Response(
            text=f'vllm:num_requests_waiting{{model_name="sim"}} {waiting}\nvllm:num_requests_running{{model_name="sim"}} 0\n'
        )

    async def set_waiting(request: web.Request) -> web.Response:
        request.app["waiting"] = int(request.query.get("n", "0"))
        return web.Response(text="ok")

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        request.app["requests"] += 1
        model = body.get("model", "sim")
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "slow":
            await asyncio.sleep(delay)
        if mode == "error":
            return web.json_response(
                {"error": {"message": "simulated failure", "type": "internal_error", "param": None, "code": None}},
                status=500,
            )
        n = int(body.get("max_tokens") or chunks)
        usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
        if not body.get("stream"):
            text = "".join(f" t{i}" for i in range(n))
            return web.json_response(
                {
                    "id": "cmpl-sim",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        for i in range(n):
            if mode == "drop" and i == 3:
                request.transport.close() if request.transport else None
                return resp
            await resp.write(_chunk(i, model))
            if chunk_delay:
                await asyncio.sleep(chunk_delay)
        so = body.get("stream_options") or {}
        if so.get("include_usage"):
            u = {"id": "cmpl-sim", "object": "text_completion", "created": 0, "model": model, "choices": [], "usage": usage}
            await resp.write(b"data: " + json.dumps(u, separators=(",", ":")).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["waiting"] = 0
    app["requests"] = 0
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/sim/waiting", set_waiting)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", default="normal", choices=["normal", "hang", "slow", "error", "drop"])
    p.add_argument("--chunks", type=int, default=256)
    p.add_argument("--delay", type=float, default=2.0)
    p.add_argument("--chunk-delay", type=float, default=0.0)
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(a.mode, a.chunks, a.delay, a.chunk_delay), host="127.0.0.1", port=a.port, print=None, access_log=None, shutdown_timeout=0.5)


if __name__ == "__main__":
    main()
