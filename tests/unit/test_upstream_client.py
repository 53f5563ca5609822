"""The hot path's HTTP/1.1 client (gateway/upstream.py) against a real asyncio HTTP server on 127.0.0.1.

The server below answers by path (length-delimited, chunked, close-delimited, broken, hanging, held,
stale keep-alive, a large stream) and records every connection and request it saw.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
import uvloop

from gateway.upstream import (
    HIGH_WATER,
    PoolTimeoutError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamSession,
)

# Overriding event_loop_policy (below) is deprecated in favour of a conftest hook; it still works.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the:pytest.PytestDeprecationWarning")

BIG_CHUNK = 64 * 1024
BIG_CHUNKS = 256  # 16 MiB in all


@dataclass
class Seen:
    path: str
    conn: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    port: int = 0
    conns: int = 0
    closed: int = 0
    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    big_sent: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        conn, served = self.conns, 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Seen(path, conn, headers, body))
                served += 1
                if not await self.answer(path, served, writer):
                    return
        finally:
            self.closed += 1
            writer.close()

    async def answer(self, path: str, served: int, w: asyncio.StreamWriter) -> bool:
        """Write the answer for ``path``; False closes the connection."""
        if path == "/len":
            w.write(
                b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
            )
        elif path == "/chunked":
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
                w.write(b"%x\r\n%s\r\n" % (len(part), part))
                await w.drain()
            w.write(b"0\r\n\r\n")
        elif path == "/close":
            w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            await w.drain()
            return False
        elif path == "/drop":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
            await w.drain()
            return False
        elif path == "/silent":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
            await w.drain()
            await asyncio.sleep(3600)
        elif path == "/hang":
            await asyncio.sleep(3600)
        elif path == "/hold":
            await self.release.wait()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nheld")
        elif path == "/stale":
            if served > 1:
                return False  # closes a reused connection without answering, as a server timing it out
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif path == "/interim":
            w.write(
                b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nSet-Thing: a\r\nset-thing: b\r\nCONTENT-TYPE: text/plain\r\n"
                b"CONTENT-LENGTH: 2\r\n\r\nok"
            )
        elif path == "/dead":
            return False  # never answers, on any connection
        elif path == "/big":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(BIG_CHUNKS):
                w.write(b"%x\r\n%s\r\n" % (BIG_CHUNK, bytes([i % 251]) * BIG_CHUNK))
                await w.drain()
                self.big_sent += BIG_CHUNK
            w.write(b"0\r\n\r\n")
        else:
            w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        return True


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test under both loops the gateway may run on (uvicorn picks uvloop when installed)."""
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


@pytest_asyncio.fixture(loop_scope="function")
async def server() -> AsyncIterator[Server]:
    srv = Server()
    s = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    srv.port = s.sockets[0].getsockname()[1]
    yield srv
    srv.release.set()
    s.close()


def session(**kw: object) -> UpstreamSession:
    opts: dict[str, object] = {
        "max_connections": 8,
        "keepalive_timeout": 30.0,
        "connect_timeout": 2.0,
        "pool_timeout": 5.0,
    }
    opts.update(kw)
    return UpstreamSession(**opts)  # type: ignore[arg-type]


async def read_all_chunks(resp) -> bytes:  # type: ignore[no-untyped-def]
    out = b""
    while chunk := await resp.readany():
        out += chunk
    return out


async def test_keep_alive_reuses_one_connection_and_sends_our_headers(server: Server) -> None:
    s = session(basic_auth=("user", "p@ss"))
    try:
        for i in range(3):
            resp = await s.request("POST", server.url + "/len", b'{"n":%d}' % i, {"x-request-id": f"r{i}"})
            assert resp.status == 200
            assert resp.headers["content-type"] == "application/json"
            assert await resp.read() == b'{"ok":true}'
            resp.close()
        assert server.conns == 1 and s.idle_connections() == 1
        first = server.requests[0]
        assert [r.body for r in server.requests] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
        assert first.headers["host"] == f"127.0.0.1:{server.port}"
        assert first.headers["content-length"] == "7"
        assert first.headers["x-request-id"] == "r0"
        assert first.headers["authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
        assert "user-agent" not in first.headers and "accept-encoding" not in first.headers
    finally:
        await s.close()


async def test_get_without_body_sends_no_content_length(server: Server) -> None:
    s = session()
    try:
        resp = await s.request("GET", server.url + "/len")
        assert await resp.read() == b'{"ok":true}'
        assert "content-length" not in server.requests[0].headers
    finally:
        await s.close()


async def test_chunked_body_by_readany_then_connection_reused(server: Server) -> None:
    s = session()
    try:
        resp = await s.request("POST", server.url + "/chunked", b"{}")
        assert resp.headers["content-type"] == "text/event-stream"
        assert await read_all_chunks(resp) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        assert await resp.readany() == b""
        resp.close()
        resp = await s.request("POST", server.url + "/len", b"{}")
        assert await resp.read() == b'{"ok":true}'
        assert server.conns == 1
    finally:
        await s.close()


async def test_close_delimited_body_is_read_to_the_end_and_not_reused(server: Server) -> None:
    s = session()
    try:
        resp = await s.request("POST", server.url + "/close", b"{}")
        assert await resp.read() == b"until the end"
        resp = await s.request("POST", server.url + "/len", b"{}")
        assert await resp.read() == b'{"ok":true}'
        assert server.conns == 2
    finally:
        await s.close()


async def test_response_closed_before_its_end_closes_its_connection(server: Server) -> None:
    s = session()
    try:
        resp = await s.request("POST", server.url + "/big", b"{}")
        assert await resp.readany()
        resp.close()
        assert s.idle_connections() == 0
        resp = await s.request("POST", server.url + "/len", b"{}")
        assert await resp.read() == b'{"ok":true}'
        assert server.conns == 2
        for _ in range(100):  # the server's side of the abandoned connection sees it close
            if server.closed:
                break
            await asyncio.sleep(0.02)
        assert server.closed == 1
    finally:
        await s.close()


async def test_idle_connections_expire(server: Server) -> None:
    s = session(keepalive_timeout=0.1)
    try:
        resp = await s.request("POST", server.url + "/len", b"{}")
        await resp.read()
        assert s.idle_connections() == 1
        for _ in range(100):
            if server.closed:
                break
            await asyncio.sleep(0.02)
        assert s.idle_connections() == 0 and server.closed == 1
        resp = await s.request("POST", server.url + "/len", b"{}")
        assert await resp.read() == b'{"ok":true}'
        assert server.conns == 2
    finally:
        await s.close()


async def test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(server: Server) -> None:
    s = session()
    try:
        resp = await s.request("POST", server.url + "/stale", b"{}")
        assert await resp.read() == b"ok"
        resp = await s.request("POST", server.url + "/stale", b'{"again":1}')
        assert await resp.read() == b"ok"
        assert server.conns == 2
        assert [(r.conn, r.body) for r in server.requests] == [
            (1, b"{}"),
            (1, b'{"again":1}'),
            (2, b'{"again":1}'),
        ]
    finally:
        await s.close()


async def test_fresh_connection_closed_before_answering_is_broken_not_retried(server: Server) -> None:
    s = session()
    try:
        with pytest.raises(UpstreamBrokenError) as e:
            await s.request("POST", server.url + "/dead", b"{}")
        assert e.value.before_response
        assert server.conns == 1
        # A reused connection gets its one retry, and a second failure is reported as it is.
        resp = await s.request("POST", server.url + "/len", b"{}")
        await resp.read()
        with pytest.raises(UpstreamBrokenError):
            await s.request("POST", server.url + "/dead", b"{}")
        assert server.conns == 3
    finally:
        await s.close()


async def test_connect_refused_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = session()
    try:
        with pytest.raises(UpstreamConnectError):
            await s.request("POST", f"http://127.0.0.1:{port}/len", b"{}")
        assert s._busy == 0
    finally:
        await s.close()


async def test_upstream_closing_mid_body_is_broken(server: Server) -> None:
    s = session()
    try:
        resp = await s.request("POST", server.url + "/drop", b"{}")
        assert resp.status == 200
        with pytest.raises(UpstreamBrokenError) as e:
            await resp.read()
        assert not e.value.before_response
        assert s.idle_connections() == 0 and s._busy == 0
    finally:
        await s.close()


async def test_deadline_bounds_the_wait_for_headers_and_for_reads(server: Server) -> None:
    s = session()
    loop = asyncio.get_running_loop()
    try:
        with pytest.raises(TimeoutError):
            await s.request("POST", server.url + "/hang", b"{}", deadline=loop.time() + 0.1)
        assert s._busy == 0
        resp = await s.request("POST", server.url + "/silent", b"{}", deadline=loop.time() + 30)
        assert await resp.readany() == b"data: 1\n\n"
        resp.deadline = loop.time() + 0.1  # moved before a read, as the relay does per chunk
        with pytest.raises(TimeoutError):
            await resp.readany()
        resp.close()
        assert s._busy == 0 and s.idle_connections() == 0
    finally:
        await s.close()


async def test_pool_limit_waits_for_a_free_connection_then_times_out(server: Server) -> None:
    s = session(max_connections=1, pool_timeout=0.2, connect_timeout=0.1)
    try:
        held = asyncio.ensure_future(s.request("POST", server.url + "/hold", b"{}"))
        await asyncio.sleep(0.05)
        with pytest.raises(PoolTimeoutError):
            await s.request("POST", server.url + "/len", b"{}")
        waiting = asyncio.ensure_future(s.request("POST", server.url + "/len", b"{}"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        server.release.set()
        assert await (await held).read() == b"held"
        assert await (await waiting).read() == b'{"ok":true}'
        assert server.conns == 1  # the waiter got the connection the first request gave back
    finally:
        await s.close()


async def test_cancelled_waiter_passes_the_free_connection_on(server: Server) -> None:
    s = session(max_connections=1)
    try:
        held = asyncio.ensure_future(s.request("POST", server.url + "/hold", b"{}"))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(s.request("POST", server.url + "/len", b"{}"))
        second = asyncio.ensure_future(s.request("POST", server.url + "/len", b"{}"))
        await asyncio.sleep(0.05)
        gone.cancel()
        server.release.set()
        await (await held).read()
        assert await (await second).read() == b'{"ok":true}'
        assert s._busy == 0
    finally:
        await s.close()


async def test_large_stream_with_a_slow_reader_stays_bounded(server: Server) -> None:
    s = session()
    try:
        resp = await s.request("POST", server.url + "/big", b"{}")
        got = bytearray()
        peak = 0
        while True:
            await asyncio.sleep(0.002 if len(got) < 4 * 1024 * 1024 else 0)  # slow at first
            peak = max(peak, resp._size)
            chunk = await resp.readany()
            if not chunk:
                break
            got += chunk
        assert len(got) == BIG_CHUNK * BIG_CHUNKS
        assert all(got[i * BIG_CHUNK] == i % 251 for i in range(BIG_CHUNKS))
        # Reading stops above HIGH_WATER; one socket read (256 KiB at most) may land on top of it.
        assert peak <= HIGH_WATER + 256 * 1024 + BIG_CHUNK
        assert server.big_sent == BIG_CHUNK * BIG_CHUNKS
        resp = await s.request("POST", server.url + "/len", b"{}")  # the connection went back intact
        assert await resp.read() == b'{"ok":true}'
        assert server.conns == 1
    finally:
        await s.close()


async def test_line_breaks_in_headers_are_refused(server: Server) -> None:
    s = session()
    try:
        with pytest.raises(ValueError):
            await s.request("POST", server.url + "/len", b"{}", {"x-a": "1\r\nx-injected: 2"})
        assert server.requests == []
    finally:
        await s.close()


async def test_headers_of_the_final_answer_only_case_insensitive_repeats_joined(server: Server) -> None:
    s = session()
    try:
        for _ in range(2):
            resp = await s.request("GET", server.url + "/interim")
            assert resp.status == 200 and await resp.read() == b"ok"
            assert resp.content_type == "text/plain" and resp.header(b"content-length") == b"2"
            assert resp.headers == {"set-thing": "a, b", "content-type": "text/plain", "content-length": "2"}
            assert resp.header(b"x-interim") is None
    finally:
        await s.close()
    assert server.conns == 1  # CONTENT-LENGTH framed it: the connection was kept
