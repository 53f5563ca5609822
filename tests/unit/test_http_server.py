"""Our HTTP/1.1 protocol (gateway/http_server.py) under a real uvicorn Server on 127.0.0.1, spoken to with raw
sockets: framing, keep-alive, pipelining, 100-continue, chunked bodies, HEAD, one write per known response,
streams, client disconnects, app errors and header injection."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from gateway.http_server import CONNECTION_KEY, HttpProtocol, body_received
from tests.support import free_port

# What the test app saw, for the assertions that cannot be read off the wire.
EVENTS: list[tuple[str, Any]] = []
# Responses written to each connection, as (transport.write calls).
WRITES: list[bytes] = []


class _CountingTransport:
    def __init__(self, inner: asyncio.Transport) -> None:
        self._inner = inner

    def write(self, data: bytes) -> None:
        WRITES.append(bytes(data))
        self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# Connections (the HttpProtocol objects) whose writing was paused by their transport at least once.
PAUSED: set[int] = set()


class CountingProtocol:
    """The gateway's protocol behind a wrapper (the protocol may be compiled, and compiled classes cannot be
    subclassed here): it sees the transport's writes and pauses, and hands everything else on."""

    def __init__(self, **kwargs: Any) -> None:
        self._inner = HttpProtocol(**kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(_CountingTransport(transport))  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        PAUSED.add(id(self._inner))
        self._inner.pause_writing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def conn_paused(scope: dict[str, Any]) -> bool:
    return id(scope[CONNECTION_KEY]) in PAUSED


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/echo":
        chunks = []
        more = True
        while more:
            msg = await receive()
            assert msg["type"] == "http.request"
            chunks.append(msg["body"])
            more = msg["more_body"]
        body = json.dumps(
            {
                "method": scope["method"],
                "path": scope["path"],
                "raw_path": scope["raw_path"].decode(),
                "query": scope["query_string"].decode(),
                "http_version": scope["http_version"],
                "body": b"".join(chunks).decode(),
                "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                "client": list(scope["client"]),
                "server": list(scope["server"]),
                "scheme": scope["scheme"],
                "has_connection": hasattr(scope.get(CONNECTION_KEY), "on_lost"),
                "state": isinstance(scope["state"], dict),
            }
        ).encode()
        # No content-length: the protocol adds it, as the body comes whole.
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x/json")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    elif path == "/body-ready":
        # Whether the whole body was there before the app read anything (the proxy then sets no body timer).
        ready = body_received(receive)
        more = True
        while more:
            more = (await receive())["more_body"]
        body = json.dumps({"ready": ready, "after_read": body_received(receive)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x/sse")]})
        for i in range(3):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/late-first-chunk":
        # The body comes after the client has read the head and then sent its request body.
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x/sse")]})
        got = await receive()
        await send({"type": "http.response.body", "body": got["body"], "more_body": False})
    elif path == "/wait-disconnect":
        conn = scope[CONNECTION_KEY]
        me = asyncio.current_task()  # the callback gets the task answering this request
        conn.on_lost(lambda task: EVENTS.append(("on_lost", task is me)))
        msg = await receive()
        while msg["type"] == "http.request":
            msg = await receive()
        EVENTS.append(("receive", msg["type"]))
    elif path == "/slow":
        EVENTS.append(("slow", None))
        await asyncio.sleep(0.5)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"done", "more_body": False})
    elif path == "/big":
        # 16 MiB in 64 KiB chunks: more than the transport buffers, so writing pauses until the client reads.
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(256):
            await send({"type": "http.response.body", "body": bytes([i]) * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        EVENTS.append(("big", conn_paused(scope)))
    elif path == "/boom":
        raise RuntimeError("a bug in the app")
    elif path == "/boom-after-stream-start":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("a bug in the app")
    elif path == "/inject":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1\r\nset-cookie: x=1")]}
        )
        await send({"type": "http.response.body", "body": b"never", "more_body": False})
    elif path == "/length":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"ab", "more_body": True})
        await send({"type": "http.response.body", "body": b"cde", "more_body": False})
    elif path == "/close":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b"bye", "more_body": False})
    elif path == "/no-content":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def start_server(port: int, keep_alive: int = 2) -> tuple[uvicorn.Server, threading.Thread]:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=CountingProtocol,  # type: ignore[arg-type]
        ws="none",
        lifespan="on",
        log_level="critical",
        timeout_keep_alive=keep_alive,
    )
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return srv, t


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    port = free_port()
    srv, t = start_server(port)
    yield port
    srv.should_exit = True
    t.join(10)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


class Reader:
    """Reads HTTP/1.1 responses off a socket: status, headers (lowercased names) and the framed body."""

    def __init__(self, s: socket.socket) -> None:
        self.f = s.makefile("rb")

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        line = self.f.readline()
        assert line.startswith(b"HTTP/1.1 "), line
        status = int(line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            assert name.lower() not in headers, f"repeated header {name}"
            headers[name.lower()] = value.strip()
        if head_only or status in (100, 204, 304):
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self.f.read(int(headers["content-length"]))
        assert headers.get("transfer-encoding") == "chunked", headers
        body = b""
        while True:
            size = int(self.f.readline().strip(), 16)
            chunk = self.f.read(size + 2)
            if size == 0:
                return status, headers, body
            body += chunk[:-2]

    def closed(self) -> bool:
        return self.f.read(1) == b""


def test_keep_alive_serves_several_requests_on_one_connection(server: int) -> None:
    with connect(server) as s:
        r = Reader(s)
        for i in range(3):
            s.sendall(b"GET /echo?i=%d HTTP/1.1\r\nHost: x\r\nX-Thing: A b\r\n\r\n" % i)
            status, headers, body = r.response()
            assert status == 200 and headers["content-type"] == "x/json" and "date" in headers
            seen = json.loads(body)
            assert seen["method"] == "GET" and seen["path"] == "/echo" and seen["query"] == f"i={i}"
            assert seen["headers"] == [["host", "x"], ["x-thing", "A b"]]
            assert seen["http_version"] == "1.1" and seen["scheme"] == "http"
            assert seen["client"][0] == "127.0.0.1" and seen["server"] == ["127.0.0.1", server]
            assert seen["has_connection"] and seen["state"]
            assert "connection" not in headers


def test_a_whole_body_goes_out_with_its_head_in_one_write_with_a_content_length(server: int) -> None:
    with connect(server) as s:
        WRITES.clear()
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        status, headers, body = Reader(s).response()
    assert status == 200 and json.loads(body)["body"] == "hello"
    assert headers["content-length"] == str(len(body)) and "transfer-encoding" not in headers
    assert len(WRITES) == 1 and WRITES[0].startswith(b"HTTP/1.1 200 OK\r\n") and WRITES[0].endswith(body)


def test_pipelined_requests_are_answered_in_order(server: int) -> None:
    with connect(server) as s:
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
            b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo?n=3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nthree\r\n0\r\n\r\n"
        )
        r = Reader(s)
        assert json.loads(r.response()[2])["body"] == "one"
        assert r.response()[2] == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert json.loads(r.response()[2])["body"] == "three"


def test_chunked_request_body_arrives_in_pieces(server: int) -> None:
    with connect(server) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        time.sleep(0.1)
        s.sendall(b"3\r\nefg\r\n0\r\n\r\n")
        status, _, body = Reader(s).response()
    assert status == 200 and json.loads(body)["body"] == "abcdefg"


def test_expect_100_continue_is_answered_when_the_app_reads(server: int) -> None:
    with connect(server) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        r = Reader(s)
        assert r.response()[0] == 100
        s.sendall(b"body")
        status, _, body = r.response()
    assert status == 200 and json.loads(body)["body"] == "body"


def test_expect_100_unread_body_closes_the_connection(server: int) -> None:
    with connect(server) as s:
        s.sendall(b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        r = Reader(s)
        status, headers, _ = r.response()
        assert status == 404 and headers["connection"] == "close" and r.closed()


def test_head_has_the_headers_and_no_body(server: int) -> None:
    with connect(server) as s:
        r = Reader(s)
        s.sendall(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = r.response(head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0
        # The next response on the connection starts right after the head: no body bytes were sent.
        s.sendall(b"GET /no-content HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = r.response()
        assert status == 204 and body == b"" and "content-length" not in headers


def test_streams_are_chunked_and_written_as_they_come(server: int) -> None:
    with connect(server) as s:
        WRITES.clear()
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = Reader(s).response()
    assert status == 200 and headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    # The head once the app waited (before its first event), then one write per event, then the last chunk.
    assert len(WRITES) == 5 and WRITES[0].endswith(b"\r\n\r\n") and WRITES[-1] == b"0\r\n\r\n"


def test_a_head_whose_body_is_late_is_not_held_back(server: int) -> None:
    with connect(server) as s:
        s.sendall(b"POST /late-first-chunk HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        r = Reader(s)
        # The app sends its body only once it has the request body, which is sent after the head was read.
        status, headers, _ = r.response(head_only=True)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        s.sendall(b"late")
        assert r.f.readline().strip() == b"4" and r.f.readline() == b"late\r\n"


def test_body_received_says_whether_reading_the_body_could_wait(server: int) -> None:
    with connect(server) as s:
        r = Reader(s)
        # The body in the same packet as the head: complete before the app runs.
        s.sendall(b"POST /body-ready HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert json.loads(r.response()[2]) == {"ready": True, "after_read": False}
        # Only the head: the body is still to come, so a read could wait.
        s.sendall(b"POST /body-ready HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
        time.sleep(0.2)
        s.sendall(b"abc")
        assert json.loads(r.response()[2]) == {"ready": False, "after_read": False}
        # Expect: 100-continue: the client waits for the interim answer, so the body is not there.
        s.sendall(
            b"POST /body-ready HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        assert r.f.readline().startswith(b"HTTP/1.1 100")
        r.f.readline()
        s.sendall(b"ok")
        assert json.loads(r.response()[2]) == {"ready": False, "after_read": False}
    # Not this server's receive (another server, a test client): never claimed.
    assert body_received(lambda: None) is False


def test_declared_length_sent_in_pieces(server: int) -> None:
    with connect(server) as s:
        status, headers, body = (
            s.sendall(b"GET /length HTTP/1.1\r\nHost: x\r\n\r\n"),
            *Reader(s).response(),
        )[1:]
    assert status == 200 and headers["content-length"] == "5" and body == b"abcde"


def test_connection_close_from_the_client_and_from_the_app(server: int) -> None:
    for req in (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /close HTTP/1.1\r\n\r\n",
    ):
        with connect(server) as s:
            s.sendall(req)
            r = Reader(s)
            status, headers, _ = r.response()
            assert status == 200 and headers["connection"] == "close" and r.closed()


def test_http_1_0_gets_its_answer_and_the_connection_closes(server: int) -> None:
    with connect(server) as s:
        s.sendall(b"GET /stream HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head and b"connection: close" in head
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_client_disconnect_reaches_receive_and_on_lost(server: int) -> None:
    EVENTS.clear()
    s = connect(server)
    s.sendall(b"POST /wait-disconnect HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    time.sleep(0.2)
    s.close()
    deadline = time.monotonic() + 5
    while len(EVENTS) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(EVENTS) == [("on_lost", True), ("receive", "http.disconnect")]


@pytest.mark.parametrize("path", ["/boom", "/inject"])
def test_app_errors_before_anything_was_sent_are_an_openai_500(server: int, path: str) -> None:
    with connect(server) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        r = Reader(s)
        status, headers, body = r.response()
        assert status == 500 and headers["connection"] == "close" and r.closed()
    assert json.loads(body)["error"]["code"] == "internal_error"
    assert b"set-cookie" not in body


def test_an_app_error_mid_stream_cuts_the_connection(server: int) -> None:
    with connect(server) as s:
        s.sendall(b"GET /boom-after-stream-start HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and b"partial" in data and not data.endswith(b"0\r\n\r\n")


def test_idle_keep_alive_connections_close_after_the_timeout(server: int) -> None:
    with connect(server) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        r = Reader(s)
        assert r.response()[0] == 200
        s.settimeout(10)
        assert r.closed()  # after timeout_keep_alive (2 s here)


def test_graceful_shutdown_finishes_requests_in_flight_and_closes_idle_connections() -> None:
    port = free_port()
    srv, t = start_server(port, keep_alive=60)  # idle connections close because of the shutdown only
    EVENTS.clear()
    idle, busy = connect(port), connect(port)
    try:
        idle.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        idle_reader = Reader(idle)
        assert idle_reader.response()[0] == 200
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 10
        while ("slow", None) not in EVENTS and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.should_exit = True
        assert idle_reader.closed()
        busy_reader = Reader(busy)
        status, headers, body = busy_reader.response()
        assert status == 200 and body == b"done" and headers["connection"] == "close" and busy_reader.closed()
        t.join(10)
        assert not t.is_alive()
    finally:
        idle.close()
        busy.close()
        srv.should_exit = True


def test_large_bodies_flow_both_ways(server: int) -> None:
    body = b"0123456789abcdef" * 65536  # 1 MiB: reading pauses while the app has not taken it
    EVENTS.clear()
    with connect(server) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        r = Reader(s)
        status, _, echoed = r.response()
        assert status == 200 and json.loads(echoed)["body"] == body.decode()
        s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # let the server fill the socket buffers before reading
        status, _, big = r.response()
    assert status == 200 and len(big) == 256 * 65536
    assert all(big[i * 65536] == i % 256 for i in range(256))
    assert EVENTS == [("big", True)]


class _AppWithDirectRoutes:
    """An app offering ``direct_routes`` (as GatewayApp does): the server calls those itself."""

    def __init__(self) -> None:
        self.calls = 0
        self.direct_routes = {"/direct": self.direct, "/direct-boom": self.boom}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await app(scope, receive, send)
            return
        self.calls += 1
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def direct(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-direct", b"1")]})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    async def boom(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("a bug in a direct route")


@pytest.mark.parametrize("root_path", ["", "/prefix"])
def test_direct_routes_are_called_by_the_server_itself(root_path: str) -> None:
    target = _AppWithDirectRoutes()
    config = uvicorn.Config(
        target,
        host="127.0.0.1",
        port=free_port(),
        http=HttpProtocol,
        ws="none",
        log_level="critical",
        root_path=root_path,
        proxy_headers=False,  # uvicorn's default wraps the app (forwarded headers): then no direct calls
    )
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        with connect(config.port) as s:
            r = Reader(s)
            for path in ("/direct", "/other", "/direct-boom"):
                s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
                status, headers, body = r.response()
                if root_path:  # under a root path every request goes through the app's own dispatch
                    assert status == 404
                elif path == "/direct":
                    assert (status, headers.get("x-direct"), body) == (200, "1", b"/direct")
                elif path == "/other":
                    assert status == 404
                else:  # an error escaping a direct route: the OpenAI-shaped 500, as for any app
                    assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
                    break
        assert target.calls == (3 if root_path else 1)
    finally:
        srv.should_exit = True
        t.join(10)
