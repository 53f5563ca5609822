"""A simulated OpenAI-style upstream for faults a real vLLM cannot be made to produce on demand.

Run as a subprocess: ``python -m tests.fakes.fake_upstream --port N [--mode MODE]``. The mode can be
changed at run time with ``POST /_mode {"mode": ..., "delay": s}``; ``GET /_stats`` returns how many
completion requests arrived. ``/health`` and ``/metrics`` always answer (a replica that looks alive but
misbehaves on real traffic, which only passive health can catch).

Modes (for /v1/completions and /v1/chat/completions):
  ok               a short, well-formed answer (stream or not)
  hang             accept the request, never answer (no headers, no bytes)
  slow_first_byte  send the stream's headers at once, the first event only after ``delay`` seconds
  error500         answer 500 with an error body
  error400         answer 400 with an OpenAI-shaped error (a client error: not an upstream fault)
  drop_mid_stream  send two events, then cut the connection
  stall_mid_stream send two events, then go silent
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

state = {"mode": "ok", "delay": 5.0, "completions": 0}


def _chunk(i: int, chat: bool) -> bytes:
    if chat:
        obj = {
            "id": "fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": "tiny",
            "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
        }
    else:
        obj = {
            "id": "fake",
            "object": "text_completion",
            "created": int(time.time()),
            "model": "tiny",
            "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}],
        }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def completions(request: web.Request) -> web.StreamResponse:
    state["completions"] += 1
    body = await request.json()
    chat = request.path.endswith("chat/completions")
    stream = bool(body.get("stream"))
    mode = state["mode"]
    n = int(body.get("max_tokens") or 4)
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode == "error500":
        return web.json_response(
            {
                "error": {
                    "message": "fake internal error",
                    "type": "internal_error",
                    "param": None,
                    "code": None,
                }
            },
            status=500,
        )
    if mode == "error400":
        return web.json_response(
            {
                "error": {
                    "message": "fake bad request",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status=400,
        )
    usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
    if not stream:
        choice = {"index": 0, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": "x " * n}} if chat else {"text": "x " * n})
        return web.json_response(
            {
                "id": "fake",
                "object": "chat.completion" if chat else "text_completion",
                "model": "tiny",
                "choices": [choice],
                "usage": usage,
            }
        )
    resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    if mode == "slow_first_byte":
        await asyncio.sleep(state["delay"])
    for i in range(n):
        await resp.write(_chunk(i, chat))
        if i == 1 and mode == "drop_mid_stream":
            await asyncio.sleep(0.05)
            request.transport.abort()
            return resp
        if i == 1 and mode == "stall_mid_stream":
            await asyncio.sleep(3600)
        await asyncio.sleep(0.01)
    await resp.write(b"data: " + json.dumps({"id": "fake", "choices": [], "usage": usage}).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\nvllm:kv_cache_usage_perc 0\n"
    )


async def set_mode(request: web.Request) -> web.Response:
    body = await request.json()
    state["mode"] = body.get("mode", state["mode"])
    state["delay"] = float(body.get("delay", state["delay"]))
    if body.get("reset"):
        state["completions"] = 0
    return web.json_response(state)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(state)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", default="ok")
    p.add_argument("--delay", type=float, default=5.0)
    a = p.parse_args()
    state["mode"], state["delay"] = a.mode, a.delay
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/_mode", set_mode)
    app.router.add_get("/_stats", stats)
    web.run_app(app, host="127.0.0.1", port=a.port, print=None, access_log=None, shutdown_timeout=0.2)


if __name__ == "__main__":
    main()
