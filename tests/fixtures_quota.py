"""Fixtures for quota tests: a real redis-server on 127.0.0.1, and a simulated upstream whose /metrics
reports a long engine queue (fault injection for overload protection only)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support import Proc, free_port

__all__ = ["QueueingUpstream", "RedisServer", "own_redis", "queueing_upstream", "redis_server"]

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A throwaway redis-server (no persistence) that can be stopped and started again on the same port."""

    def __init__(self, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="redis-")
        self.proc: Proc | None = None

    def start(self) -> RedisServer:
        self.proc = Proc(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning"],
            name="redis",
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.proc.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on {self.port} not ready")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=10)
            self.proc = None

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


def _need_redis() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed: apt-get install -y redis-server (CI installs it)")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session; tests use distinct key prefixes (or flush) to stay independent."""
    _need_redis()
    r = RedisServer().start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone (for tests that stop it)."""
    _need_redis()
    r = RedisServer().start()
    try:
        yield r
    finally:
        r.stop()


class QueueingUpstream:
    """A simulated OpenAI upstream (fault injection): healthy, answers chat completions at once, and reports
    ``waiting`` in ``vllm:num_requests_waiting`` on /metrics (settable while running)."""

    def __init__(self, waiting: int = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.waiting = waiting
        self.served = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        from aiohttp import web

        async def health(request):
            return web.Response(text="")

        async def metrics(request):
            body = (
                "# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{engine="0",model_name="tiny"}} {float(self.waiting)}\n'
                f'vllm:num_requests_running{{engine="0",model_name="tiny"}} 1.0\n'
            )
            return web.Response(text=body, content_type="text/plain")

        async def chat(request):
            body = await request.json()
            self.served += 1
            n = int(body.get("max_tokens") or 1)
            out = {
                "id": "chatcmpl-sim", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * n}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
            }
            return web.Response(text=json.dumps(out), content_type="application/json")

        async def main():
            app = web.Application()
            app.router.add_get("/health", health)
            app.router.add_get("/metrics", metrics)
            app.router.add_post("/v1/chat/completions", chat)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            self._ready.set()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())
        self._loop.run_forever()

    def start(self) -> QueueingUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("simulated upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            async def _close():
                await self._runner.cleanup()

            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@pytest.fixture
def queueing_upstream() -> Iterator[QueueingUpstream]:
    u = QueueingUpstream().start()
    try:
        yield u
    finally:
        u.stop()
