#!/usr/bin/env python3
"""A simulated OpenAI-compatible upstream, for fault injection and for measuring the gateway's own overhead.

Never the only test of a feature: real behaviour is tested against a real vLLM engine. Used by the fault
tests (tests/fixtures_routing.py, tests/fixtures_quota.py, tests/integration/test_gateway_core.py, the alert
tests) and by scripts/bench_overhead.py.

    scripts/sim_upstream.py --port N [--mode MODE] [--delay S] [--chunks N] [--chunk-delay S]

Modes (for /v1/completions and /v1/chat/completions):
  ok               a well-formed answer at once; a stream sends ``max_tokens`` (default ``--chunks``) small
                   SSE events, ``--chunk-delay`` s apart, then usage (when asked, as vLLM does) and [DONE]
  hang             accept the request, never answer (no headers, no bytes)
  slow             wait ``delay`` s before answering at all (before the headers)
  slow_first_byte  send the stream's headers at once, the first event only after ``delay`` s
  error500         answer 500 with an OpenAI-shaped error body
  error400         answer 400 with an OpenAI-shaped error (a client error: not an upstream fault)
  drop_mid_stream  send two events, then cut the connection
  stall_mid_stream send two events, then go silent

``/health`` always answers and ``/metrics`` serves vLLM's load gauges (``vllm:num_requests_waiting``,
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``): a replica that looks alive but misbehaves on
real traffic, which only passive health can catch. At run time, ``POST /_mode`` with a JSON body changes any
of ``mode``, ``delay``, ``waiting``, ``running``, ``kv_cache_usage`` (``reset: true`` zeroes the request
count); ``GET /_stats`` returns the state, with ``completions`` = completion requests received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

MODES = (
    "ok",
    "hang",
    "slow",
    "slow_first_byte",
    "error500",
    "error400",
    "drop_mid_stream",
    "stall_mid_stream",
)


@dataclass
class SimState:
    mode: str = "ok"
    delay: float = 5.0
    chunks: int = 256
    chunk_delay: float = 0.0
    completions: int = 0
    # What /metrics reports, as a vLLM engine would.
    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0


STATE = web.AppKey("state", SimState)


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(i: int, model: str, chat: bool) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": f" t{i}", "logprobs": None, "finish_reason": None}
        kind = "text_completion"
    return _event({"id": "cmpl-sim", "object": kind, "created": 0, "model": model, "choices": [choice]})


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status)


async def completions(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    st.completions += 1
    body = await request.json()
    chat = request.path.endswith("chat/completions")
    model = str(body.get("model", "sim"))
    mode = st.mode
    if mode == "hang":
        await asyncio.sleep(3600)
    if mode == "slow":
        await asyncio.sleep(st.delay)
    if mode == "error500":
        return _error(500, "simulated failure", "internal_error")
    if mode == "error400":
        return _error(400, "simulated bad request", "invalid_request_error")
    n = int(body.get("max_tokens") or st.chunks)
    usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
    if not body.get("stream"):
        text = "".join(f" t{i}" for i in range(n))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return web.json_response(
            {
                "id": "cmpl-sim",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        )
    resp = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    if mode == "slow_first_byte":
        await asyncio.sleep(st.delay)
    for i in range(n):
        await resp.write(_chunk(i, model, chat))
        if i == 1 and mode == "drop_mid_stream":
            await asyncio.sleep(0.05)
            if request.transport is not None:
                request.transport.abort()
            return resp
        if i == 1 and mode == "stall_mid_stream":
            await asyncio.sleep(3600)
        if st.chunk_delay:
            await asyncio.sleep(st.chunk_delay)
    if (body.get("stream_options") or {}).get("include_usage"):
        kind = "chat.completion.chunk" if chat else "text_completion"
        await resp.write(
            _event(
                {
                    "id": "cmpl-sim",
                    "object": kind,
                    "created": 0,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    lbl = '{model_name="sim"}'
    return web.Response(
        text=(
            f"vllm:num_requests_waiting{lbl} {st.waiting}\n"
            f"vllm:num_requests_running{lbl} {st.running}\n"
            f"vllm:kv_cache_usage_perc{lbl} {st.kv_cache_usage}\n"
        )
    )


async def set_mode(request: web.Request) -> web.Response:
    st = request.app[STATE]
    body = await request.json()
    mode = body.get("mode", st.mode)
    if mode not in MODES:
        return _error(400, f"unknown mode {mode!r}; one of {', '.join(MODES)}", "invalid_request_error")
    st.mode = mode
    st.delay = float(body.get("delay", st.delay))
    st.waiting = int(body.get("waiting", st.waiting))
    st.running = int(body.get("running", st.running))
    st.kv_cache_usage = float(body.get("kv_cache_usage", st.kv_cache_usage))
    if body.get("reset"):
        st.completions = 0
    return web.json_response(asdict(st))


async def stats(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[STATE]))


def make_app(state: SimState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/_mode", set_mode)
    app.router.add_get("/_stats", stats)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", default="ok", choices=MODES)
    p.add_argument("--delay", type=float, default=5.0, help="seconds, for slow and slow_first_byte")
    p.add_argument("--chunks", type=int, default=256, help="stream events when the request has no max_tokens")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between stream events")
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    state = SimState(mode=a.mode, delay=a.delay, chunks=a.chunks, chunk_delay=a.chunk_delay)
    web.run_app(
        make_app(state), host="127.0.0.1", port=a.port, print=None, access_log=None, shutdown_timeout=0.5
    )


if __name__ == "__main__":
    main()
