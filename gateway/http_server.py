"""The HTTP/1.1 protocol the gateway serves with: our own, on httptools' parser, under uvicorn's ``Server``.

uvicorn instantiates the class named by ``http="gateway.http_server:HttpProtocol"`` once per connection, so its
lifespan, sockets, signals, the draining server (gateway/drain.py) and the worker supervisor are unchanged.
What this protocol does differently from uvicorn's own httptools protocol:

- **Bounded request heads.** It counts the bytes and header lines of each request head as they arrive and
  answers ``431`` and closes once the head passes ``max_header_bytes`` or ``max_header_count`` (the parser is
  dropped at once: nothing more is buffered); ``408`` and closes when a head is not complete
  ``header_timeout`` seconds after its first byte (slow-loris); a malformed request gets ``400``. All three in
  OpenAI's error shape.
- **One write per known response.** The response head is built once, as bytes, and held until the first body
  message: the head and the body go out in one ``transport.write``, and a body sent whole
  (``more_body: False``) without a ``content-length`` gets one instead of chunked framing. A head whose body
  does not follow at once (a stream waiting for its first event) is written as soon as the app waits for
  something, so no latency is added. Stream chunks are written as they come, one write per ``send``.
- **Less per-request work.** No per-header validation loop on responses (one scan of the built head refuses a
  CR or LF smuggled into a header), no per-request ``Event`` or wrapper coroutine (the app's coroutine is the
  request's task; a done callback answers 500 when it failed before anything was sent), one idle timer and
  one head timer per connection that are re-armed lazily instead of a timer created and cancelled per request.
- **Client disconnects as a callback.** The scope carries the connection under ``gateway.connection``; its
  ``on_lost(callback)`` is how the proxy learns that a client left without a task blocked on ``receive()``.

Everything else an ASGI server owes the app is kept: the ASGI 3 http scope, ``receive()`` semantics (body
chunks, ``more_body``, ``http.disconnect``), keep-alive with uvicorn's ``timeout_keep_alive``, pipelining,
``Expect: 100-continue``, chunked request bodies, HEAD, ``Connection: close``, flow control in both directions,
uvicorn's ``limit_concurrency``, default headers (``date``), graceful shutdown (``shutdown()`` closes idle
connections and lets in-flight requests finish) and forwarded headers from trusted proxies (uvicorn wraps the
app in its ProxyHeadersMiddleware before this protocol sees it).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from gateway.settings import GatewaySettings

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_HEADER_COUNT = 100
DEFAULT_HEADER_TIMEOUT = 10.0
# Request body bytes buffered before reading from the socket pauses (until the app calls receive()).
HIGH_WATER = 65536

log = logging.getLogger("uvicorn.error")


def error_bytes(status: int, message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    """A complete HTTP/1.1 response with an OpenAI-shaped error body that closes the connection."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )


# The scope key under which a request finds its connection (HttpProtocol.on_lost).
CONNECTION_KEY = "gateway.connection"

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_INTERNAL_ERROR = error_bytes(500, "Internal server error.", "internal_error", "server_error")
_NO_BODY_STATUS = frozenset((204, 304))
# Response headers that change how the body is framed or whether the connection stays open.
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))


class _HeadTooLarge(Exception):
    pass


class _Request:
    """One request on a connection: its scope, the body received so far, and the response's progress.

    ``receive`` and ``send`` are the ASGI callables the app gets (bound methods of this object)."""

    __slots__ = (
        "conn",
        "scope",
        "body",
        "more_body",
        "last_delivered",
        "waiter",
        "disconnected",
        "keep_alive",
        "waiting_100",
        "head",
        "head_pending",
        "status",
        "close_header",
        "started",
        "complete",
        "written",
        "chunked",
        "remaining",
        "head_request",
        "task",
    )

    def __init__(
        self, conn: HttpProtocol, scope: dict[str, Any], keep_alive: bool, waiting_100: bool
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.body: bytes | bytearray = b""
        self.more_body = True
        self.last_delivered = False  # the http.request message with more_body False was returned
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_100 = waiting_100
        # The response: the head as built from http.response.start, until written with the first body bytes.
        self.head: list[bytes] | None = None
        self.head_pending = False
        self.status = 0
        self.close_header = False
        self.started = False
        self.complete = False
        self.written = False  # any byte of the response went to the transport
        self.chunked = False
        self.remaining = -1  # bytes still owed under a content-length, -1 when there is none
        self.head_request = scope["method"] == "HEAD"
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    # -- receive --------------------------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        conn = self.conn
        if self.waiting_100:
            self.waiting_100 = False
            if not conn.transport.is_closing():
                conn.transport.write(_CONTINUE)
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if self.body or (not self.more_body and not self.last_delivered):
                break
            # Nothing to hand over yet (or the whole body was handed over: wait for the disconnect).
            if conn.read_paused:
                conn.read_paused = False
                conn.transport.resume_reading()
            self.waiter = w = conn.loop.create_future()
            await w
        body, self.body = self.body, b""
        if not self.more_body:
            self.last_delivered = True
        if conn.read_paused and conn.parsing is self:
            conn.read_paused = False
            conn.transport.resume_reading()
        return {"type": "http.request", "body": bytes(body), "more_body": self.more_body}

    # -- send -----------------------------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self._start(message["status"], message.get("headers", ()))
            return
        if self.complete:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        self._body(message.get("body", b""), message.get("more_body", False))

    def _start(self, status: int, headers: Any) -> None:
        self.started = True
        self.status = status
        if self.waiting_100:
            # Answered without reading a body the client was told to wait with: it may send it or not, so
            # the connection cannot carry another request.
            self.waiting_100 = False
            if self.more_body:
                self.keep_alive = False
        conn = self.conn
        if conn.access_log:
            conn.log_access(self.scope, status)
        lines: list[bytes] = []
        close = False
        append = lines.append
        for name, value in headers:
            name = name.lower()
            if name in _FRAMING:  # one set lookup for the usual header, three compares only for these
                if name == b"content-length":
                    if self.remaining < 0 and not self.chunked:
                        self.remaining = int(value)
                elif name == b"transfer-encoding":
                    if value.lower() == b"chunked":
                        self.chunked = True
                        self.remaining = -1
                elif b"close" in value.lower():
                    close = True
            append(b"%s: %s\r\n" % (name, value))
        # One scan of the app's header lines instead of one per header: each line we built ends with one CRLF,
        # so any other CR or LF came from a name or a value (response splitting).
        block = b"".join(lines)
        n = len(lines)
        if block.count(b"\n") != n or block.count(b"\r") != n:
            raise RuntimeError("Invalid HTTP header: CR or LF in a header name or value.")
        if close:
            self.keep_alive = False
            self.close_header = True
        self.head = [STATUS_LINE[status], conn.default_head(), block]
        self.head_pending = True
        # Written with the first body message; if the app waits for something first, as soon as it does.
        conn.loop.call_soon(self._flush_head)

    def _finish_head(self, body_len: int, last: bool) -> bytes:
        """The head as bytes, with the framing chosen now that the first body message (or none) is known."""
        parts = self.head
        assert parts is not None
        self.head = None
        self.head_pending = False
        if self.remaining < 0 and not self.chunked:
            if self.status in _NO_BODY_STATUS:
                pass
            elif last:
                if body_len or not self.head_request:
                    parts.append(b"content-length: %d\r\n" % body_len)
                    self.remaining = body_len
            elif self.head_request:
                pass
            elif self.scope["http_version"] == "1.1":
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        if not self.keep_alive and not self.close_header:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _flush_head(self) -> None:
        if not self.head_pending or self.disconnected:
            return
        data = self._finish_head(0, False)
        self.written = True
        self.conn.transport.write(data)

    def _body(self, body: bytes, more_body: bool) -> None:
        if self.head_pending:
            head = self._finish_head(len(body), not more_body)
        else:
            head = b""
        if self.head_request:
            data = head
        elif self.chunked:
            if body:
                data = b"%s%x\r\n%s\r\n" % (head, len(body), body)
            else:
                data = head
            if not more_body:
                data += b"0\r\n\r\n"
        else:
            if self.remaining >= 0:
                if len(body) > self.remaining:
                    raise RuntimeError("Response content longer than Content-Length")
                self.remaining -= len(body)
            data = head + body if head else body
        if data:
            self.written = True
            self.conn.transport.write(data)
        if not more_body:
            if self.remaining > 0 and not self.head_request:
                raise RuntimeError("Response content shorter than Content-Length")
            self._completed()

    def _completed(self) -> None:
        self.complete = True
        self.wake()
        self.conn.response_complete(self)

    # -- the end of the app's coroutine ---------------------------------------------------------------------

    def done(self, task: asyncio.Task[None]) -> None:
        conn = self.conn
        conn.tasks.discard(task)
        if task.cancelled():
            if self.disconnected:
                return  # cancelled because its client left: nothing to answer, nothing to report
            exc: BaseException | None = asyncio.CancelledError()
        else:
            exc = task.exception()
        if exc is not None:
            log.error("Exception in ASGI application\n", exc_info=exc)
            self._fail()
        elif task.result() is not None:
            log.error("ASGI callable should return None, but returned '%s'.", task.result())
            conn.transport.close()
        elif not self.complete and not self.disconnected:
            if not self.started:
                log.error("ASGI callable returned without starting response.")
            else:
                log.error("ASGI callable returned without completing response.")
            self._fail()

    def _fail(self) -> None:
        """The app failed: a 500 if nothing of the response was written yet, else the connection is cut."""
        if self.disconnected or self.complete:
            return
        transport = self.conn.transport
        if not self.written and not transport.is_closing():
            self.head = None
            self.head_pending = False
            self.written = True
            self.keep_alive = False
            transport.write(_INTERNAL_ERROR)
            self._completed()
        else:
            transport.close()


class HttpProtocol(asyncio.Protocol):
    max_header_bytes: ClassVar[int] = DEFAULT_MAX_HEADER_BYTES
    max_header_count: ClassVar[int] = DEFAULT_MAX_HEADER_COUNT
    header_timeout: ClassVar[float] = DEFAULT_HEADER_TIMEOUT

    # The server's default headers (``date``, refreshed each second) as bytes, rebuilt when the list changes.
    _default_src: ClassVar[list[tuple[bytes, bytes]] | None] = None
    _default_bytes: ClassVar[bytes] = b""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        # Exact paths the app answers with an ASGI app of their own (GatewayApp.direct_routes: the proxied
        # routes): called straight from here, without the app's dispatch coroutine in every resume. Only when
        # nothing wraps the app (a wrapper, such as forwarded-header handling, must see every request).
        direct = getattr(self.app, "direct_routes", None)
        self.direct: dict[str, Any] | None = (
            direct if isinstance(direct, dict) and not config.root_path else None
        )
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.app_state = app_state
        self.root_path = config.root_path
        self.asgi = {"version": config.asgi_version, "spec_version": "2.3"}
        self.limit_concurrency = config.limit_concurrency
        self.timeout_keep_alive = float(config.timeout_keep_alive)
        self.reset_contextvars = bool(getattr(config, "reset_contextvars", False))
        access = logging.getLogger("uvicorn.access")
        self.access_log = access.hasHandlers() and not access.disabled
        self.parser = httptools.HttpRequestParser(self)
        try:
            # Answer the first of several pipelined requests even when the client closes after sending them.
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # pragma: no cover - httptools < 0.6.3
            pass

        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.read_paused = False
        self.write_paused = False
        self._writable: asyncio.Future[None] | None = None

        # The request whose head or body is being parsed, the one being answered, and those waiting their turn.
        self.parsing: _Request | None = None
        self.active: _Request | None = None
        self.pipeline: deque[_Request] = deque()
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.expect_100 = False

        # Head limits: true from the end of one request's head (or the connection's start) until the next head
        # is complete.
        self._in_head = True
        self._head_bytes = 0
        self._head_parsed = 0
        self._head_count = 0
        self._head_started = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._rejected = False
        # Keep-alive: idle since when (0: not idle), and one timer re-armed lazily.
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        # Called once when the client's connection goes away (the proxy's disconnect watch, see on_lost()).
        self._on_lost: Callable[[asyncio.Task[None] | None], None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connections.add(self)  # type: ignore[arg-type]
        self.transport = transport  # type: ignore[assignment]
        self.server = get_local_addr(self.transport)
        self.client = get_remote_addr(self.transport)
        if is_ssl(self.transport):
            self.scheme = "https"
        # A connection that never sends a byte is closed like an idle keep-alive one.
        self._idle_since = self.loop.time()
        self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_timer_fired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._cancel_head_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for req in (self.active, self.parsing):
            if req is not None and not req.complete:
                req.disconnected = True
                req.head_pending = False
                req.wake()
        self.pipeline.clear()
        self.write_paused = False
        w, self._writable = self._writable, None
        if w is not None and not w.done():
            w.set_result(None)
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]
        cb, self._on_lost = self._on_lost, None
        if cb is not None:
            active = self.active
            cb(active.task if active is not None else None)

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        w, self._writable = self._writable, None
        if w is not None and not w.done():
            w.set_result(None)

    async def drain(self) -> None:
        w = self._writable
        if w is None or w.done():
            w = self._writable = self.loop.create_future()
        await w

    def on_lost(self, callback: Callable[[asyncio.Task[None] | None], None] | None) -> None:
        """Call ``callback(task)`` (``task``: the one answering the request in progress) if the connection is
        lost before ``on_lost(None)``: the proxy watches for a client that leaves this way instead of with a
        task blocked on ``receive()`` per request."""
        self._on_lost = callback

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: idle connections close now, busy ones after their response."""
        req = self.active
        if req is None or req.complete:
            self.transport.close()
        else:
            req.keep_alive = False
            for queued in self.pipeline:
                queued.keep_alive = False

    # -- the byte stream ----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._idle_since = 0.0
        if self._in_head:
            if self._head_bytes == 0 and self.header_timeout > 0:
                self._head_started = self.loop.time()
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(self.header_timeout, self._head_timer_fired)
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No WebSocket routes: an upgrade request is answered like any other request (the app says 404),
            # and the connection closes after it (the parser reads nothing more on it).
            for req in (self.parsing, self.active):
                if req is not None:
                    req.keep_alive = False
            return
        except httptools.HttpParserError:
            if self._rejected:
                return
            if self._head_count > self.max_header_count or self._head_parsed > self.max_header_bytes:
                self._reject(431, "The request headers are too large.", "request_header_fields_too_large")
            else:
                self._reject(400, "Invalid HTTP request received.", "invalid_http_request")
            return
        # Still inside a head after feeding everything received: all of it since the head began is head bytes.
        if self._in_head and (
            self._head_bytes > self.max_header_bytes
            or (self.headers is not None and len(self.headers) > self.max_header_count)
        ):
            self._reject(431, "The request headers are too large.", "request_header_fields_too_large")

    def _reject(self, status: int, message: str, code: str) -> None:
        self._rejected = True
        self._cancel_head_timer()
        for req in (self.parsing, self.active):
            if req is not None and not req.complete:
                req.disconnected = True
                req.wake()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, message, code))
            self.transport.close()
        # Drop what the parser holds of the head now, not when the connection object goes away.
        self.parser = httptools.HttpRequestParser(self)
        self.headers = None
        self.url = b""

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        if not self._in_head or self._rejected or self._head_bytes == 0:
            return  # re-armed when the next head begins
        left = self._head_started + self.header_timeout - self.loop.time()
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._head_timer_fired)
        else:
            self._reject(408, "The request headers were not received in time.", "request_timeout")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _idle_timer_fired(self) -> None:
        self._idle_timer = None
        since = self._idle_since
        if not since or self.transport.is_closing():
            return  # busy: re-armed when the connection is idle again
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_timer_fired)
        else:
            self.transport.close()

    # -- parser callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self._in_head:
            # A pipelined request starting inside the same chunk: its first bytes were not counted.
            self._in_head = True
            self._head_bytes = 0
        self._head_count = self._head_parsed = 0
        self.url = b""
        self.headers = []
        self.expect_100 = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100 = True
        self.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        headers = self.headers
        assert headers is not None
        if len(headers) > self.max_header_count:
            self._head_count = len(headers)
            raise _HeadTooLarge
        if self._head_bytes > self.max_header_bytes:
            self._head_parsed = len(self.url) + sum(len(k) + len(v) + 4 for k, v in headers)
            if self._head_parsed > self.max_header_bytes:
                raise _HeadTooLarge
        self._in_head = False
        self._head_bytes = 0

        parser = self.parser
        version = parser.get_http_version()
        url = self.url
        if url[:1] == b"/" and b"#" not in url:
            raw_path, _, query = url.partition(b"?")
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root = self.root_path
        scope = {
            "type": "http",
            "asgi": self.asgi,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": parser.get_method().decode("ascii"),
            "root_path": root,
            "path": root + path if root else path,
            "raw_path": root.encode("ascii") + raw_path if root else raw_path,
            "query_string": query,
            "headers": headers,
            "state": self.app_state.copy(),
            CONNECTION_KEY: self,
        }
        self.headers = None
        req = _Request(self, scope, version == "1.1" and parser.should_keep_alive(), self.expect_100)
        self.parsing = req
        active = self.active
        if active is None or active.complete:
            self._start(req)
        else:
            # Pipelined: answered in order, after the response in progress; read no further meanwhile.
            self.pipeline.append(req)
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        if req is None or req.complete:
            return
        if req.body:
            if isinstance(req.body, bytes):
                req.body = bytearray(req.body)
            req.body += body
        else:
            req.body = body
        if len(req.body) > HIGH_WATER and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        req.wake()

    def on_message_complete(self) -> None:
        # The next bytes on this connection begin a new head.
        self._in_head = True
        self._head_bytes = 0
        req = self.parsing
        if req is None or req.complete:
            return
        req.more_body = False
        req.wake()

    # -- requests -----------------------------------------------------------------------------------------

    def _start(self, req: _Request) -> None:
        self.active = req
        app = self.app
        if self.direct is not None:
            endpoint = self.direct.get(req.scope["path"])
            if endpoint is not None:
                app = endpoint
        lim = self.limit_concurrency
        if lim is not None and (len(self.connections) >= lim or len(self.tasks) >= lim):
            log.warning("Exceeded concurrency limit.")
            app = service_unavailable
        coro = app(req.scope, req.receive, req.send)
        if self.reset_contextvars:
            task = self.loop.create_task(coro, context=contextvars.Context())
        else:
            task = self.loop.create_task(coro)
        req.task = task
        self.tasks.add(task)
        task.add_done_callback(req.done)

    def response_complete(self, req: _Request) -> None:
        self.server_state.total_requests += 1
        if not req.keep_alive:
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.pipeline:
            self._start(self.pipeline.popleft())
        else:
            self._idle_since = self.loop.time()
            if self._idle_timer is None:
                self._idle_timer = self.loop.call_later(self.timeout_keep_alive, self._idle_timer_fired)

    # -- response helpers ---------------------------------------------------------------------------------

    def default_head(self) -> bytes:
        src = self.server_state.default_headers
        cls = type(self)
        if src is not cls._default_src:
            cls._default_bytes = b"".join(b"%s: %s\r\n" % (n, v) for n, v in src)
            cls._default_src = src
        return cls._default_bytes

    def log_access(self, scope: dict[str, Any], status: int) -> None:
        client = scope.get("client")
        path = urllib.parse.quote(scope["path"])
        if scope["query_string"]:
            path += "?" + scope["query_string"].decode("ascii")
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d',
            f"{client[0]}:{client[1]}" if client else "",
            scope["method"],
            path,
            scope["http_version"],
            status,
        )


def body_received(receive: Any) -> bool:
    """Whether ``receive`` is this server's and the request's whole body has arrived (reading it cannot
    wait): the proxy then reads it without arming its body timeout."""
    req = getattr(receive, "__self__", None)
    return (
        type(req) is _Request
        and not req.more_body
        and not req.last_delivered
        and not req.waiting_100
        and not req.disconnected
    )


def configure(max_header_bytes: int, max_header_count: int, header_timeout: float) -> None:
    """Sets the limits for every connection this process accepts from now on."""
    HttpProtocol.max_header_bytes = max_header_bytes
    HttpProtocol.max_header_count = max_header_count
    HttpProtocol.header_timeout = header_timeout


PROTOCOL = "gateway.http_server:HttpProtocol"


def uvicorn_options(settings: GatewaySettings) -> dict[str, Any]:
    """uvicorn Config arguments for the API port: this protocol with the configured limits, no WebSocket
    upgrades, and forwarded headers believed only from ``trusted_proxies`` (uvicorn's own default trusts
    127.0.0.1, so any local process could choose the audited client IP)."""
    lim = settings.limits
    configure(lim.max_header_bytes, lim.max_header_count, lim.header_timeout)
    trusted = [p.strip() for p in settings.trusted_proxies if p.strip()]
    return {
        "http": PROTOCOL,
        "ws": "none",
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or [],
        "server_header": False,
    }
