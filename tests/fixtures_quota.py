"""Fixtures for quota tests: a real redis-server on 127.0.0.1, and the simulated upstream whose /metrics
reports a long engine queue (fault injection for overload protection only)."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import PY, REPO, Proc, free_port, wait_http

__all__ = ["QueueingUpstream", "RedisServer", "own_redis", "queueing_upstream", "redis_server"]

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A throwaway redis-server (no persistence) that can be stopped and started again on the same port."""

    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="redis-")
        self.proc: Proc | None = None
        self.args = args  # extra redis-server options, e.g. ("--requirepass", "pw")

    def start(self) -> RedisServer:
        self.proc = Proc(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning", *self.args],
            name="redis",
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.proc.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # -NOAUTH: up, with requirepass
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
    """scripts/sim_upstream.py (fault injection only): answers at once and reports ``waiting`` as
    ``vllm:num_requests_waiting`` on /metrics; ``set_waiting(n)`` changes it while running."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc([PY, str(REPO / "scripts" / "sim_upstream.py"), "--port", str(self.port), "--chunks", "4"], name="sim-queue")

    def start(self) -> QueueingUpstream:
        wait_http(self.url + "/health", 20, self.proc.proc)
        return self

    def set_waiting(self, n: int) -> None:
        httpx.post(f"{self.url}/_mode", json={"waiting": n}, timeout=5).raise_for_status()

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def queueing_upstream() -> Iterator[QueueingUpstream]:
    u = QueueingUpstream().start()
    try:
        yield u
    finally:
        u.stop()
