"""The one long-lived HTTP client per upstream pool: a small HTTP/1.1 keep-alive client on asyncio.

The hot path sends one request and relays one response per attempt, to a handful of replicas, over
keep-alive connections. A general client (aiohttp) spent about a fifth of the event loop's CPU per request
on work this needs none of (cookie jars, redirects, per-request tasks and timers, payload writers); here
each connection is an ``asyncio.Protocol`` feeding httptools' response parser (the parser uvicorn uses),
and a request is one ``transport.write`` of a pre-built head plus the body. This module is the only place
that knows how the bytes are carried; health checks and catalog probes (off the hot path) use aiohttp.

What it keeps from the connector it replaces:

- At most ``max_connections`` connections in use per pool (all replicas together); a request waits for a
  free one at most ``pool + connect`` seconds (and the TCP connect alone at most ``connect``), else
  ``PoolTimeoutError`` / ``ConnectTimeoutError`` (both ``TimeoutError``).
- Idle connections are reused most-recent first and closed after ``keepalive_timeout`` seconds, before
  the engine's own keep-alive closes them. A reused connection that breaks before any byte of the answer
  (the engine was closing it at that moment) is retried once on a fresh connection.
- A response that is closed before its body fully arrived closes its connection (vLLM then aborts the
  request); a complete one has already given its connection back.
- Flow control: while a response holds more than ``HIGH_WATER`` unread bytes the connection stops
  reading from the socket, so a slow client bounds the buffering per stream.
- Faults: ``UpstreamConnectError`` (no connection was made: nothing was sent), ``UpstreamBrokenError``
  (the connection failed or closed after the request went out), ``UpstreamProtocolError`` (not HTTP/1.x).
- Deadlines: ``request(..., deadline=)`` and ``UpstreamResponse.deadline`` are absolute ``loop.time()``
  values bounding every wait (connection, headers, each read) with one lazily re-armed timer per response
  instead of a timeout object per phase; a wait past it raises ``TimeoutError``.

Bodies are delimited by Content-Length, chunked transfer-encoding or the connection's close. Requests
never use HEAD (a HEAD response's Content-Length would be read as a body).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools
from mypy_extensions import mypyc_attr

from gateway.settings import ModelConfig

# Unread bytes per response above which the connection stops reading from the socket.
HIGH_WATER = 256 * 1024

_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class UpstreamError(Exception):
    """The upstream request failed (a subclass says how)."""


class UpstreamConnectError(UpstreamError):
    """No connection to the replica could be made: nothing was sent."""


class UpstreamBrokenError(UpstreamError):
    """The connection failed or closed after the request went out (before or during the response)."""

    def __init__(self, message: str, before_response: bool = False) -> None:
        super().__init__(message)
        # True when not one byte of the response had arrived (a stale keep-alive connection looks so).
        self.before_response = before_response


class UpstreamProtocolError(UpstreamError):
    """The replica's answer is not valid HTTP/1.x."""


@mypyc_attr(native_class=False)  # compiled classes cannot derive from TimeoutError
class PoolTimeoutError(TimeoutError):
    """No connection of the pool became free in time."""


@mypyc_attr(native_class=False)
class ConnectTimeoutError(TimeoutError):
    """The TCP connect to the replica did not complete in time."""


class _Target:
    """A parsed upstream URL: where to connect, and the request head's constant part per method."""

    __slots__ = ("key", "host", "port", "tls", "heads", "_path", "_netloc", "_auth_line")

    def __init__(self, url: str, auth_line: bytes) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UpstreamConnectError(f"not an http(s) upstream URL: {u.scheme}://{u.hostname}")
        self.tls = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.tls else 80)
        self.key = (u.scheme, self.host, self.port)
        self._path = (u.path or "/") + ("?" + u.query if u.query else "")
        self._netloc = u.netloc.rpartition("@")[2]
        self._auth_line = auth_line
        self.heads: dict[str, bytes] = {}

    def head(self, method: str) -> bytes:
        """``METHOD path HTTP/1.1``, Host and (when configured) Authorization lines, encoded once."""
        h = self.heads.get(method)
        if h is None:
            line = f"{method} {self._path} HTTP/1.1\r\nHost: {self._netloc}\r\n"
            h = self.heads[method] = line.encode("latin-1") + self._auth_line
        return h


class UpstreamResponse:
    """One upstream response: ``status``, ``headers`` (lower-case names), and the body read by ``read()`` or
    ``readany()``. ``deadline`` (loop time, or None) bounds every wait for more data."""

    __slots__ = (
        "status",
        "raw_headers",
        "_headers",
        "_content_type",
        "deadline",
        "_conn",
        "_loop",
        "_chunks",
        "_size",
        "_headers_done",
        "_eof",
        "_exc",
        "_waiter",
        "_timer",
        "_timer_at",
        "_got_bytes",
        "_close_delimited",
    )

    def __init__(self, conn: _Connection, deadline: float | None) -> None:
        self.status = 0
        # As the parser gave them (name, value); ``headers`` decodes them on first use (most answers are only
        # asked for their content type).
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self._headers: dict[str, str] | None = None
        self._content_type: bytes | None = None
        self.deadline = deadline
        self._conn: _Connection | None = conn
        self._loop = conn.loop
        self._chunks: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._got_bytes = False
        self._close_delimited = False

    @property
    def headers(self) -> dict[str, str]:
        """The headers, lower-case names; a repeated header's values joined with ", "."""
        h = self._headers
        if h is None:
            h = self._headers = {}
            for name, value in self.raw_headers:
                k = name.decode("latin-1").lower()
                v = value.decode("latin-1")
                h[k] = h[k] + ", " + v if k in h else v
        return h

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case) without decoding the others."""
        for k, v in self.raw_headers:
            if k == name or k.lower() == name:
                return v
        return None

    @property
    def content_type(self) -> str:
        v = self._content_type  # the first Content-Type (kept by the parser callback)
        return "" if v is None else v.decode("latin-1")

    # -- the reader's side

    async def _wait(self) -> None:
        fut = self._loop.create_future()
        self._waiter = fut
        dl = self.deadline
        if dl is not None and (self._timer is None or self._timer_at > dl):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = dl
            self._timer = self._loop.call_at(dl, self._on_timer)
        try:
            await fut
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        w = self._waiter
        dl = self.deadline
        if w is None or w.done() or dl is None:
            return  # not waiting now: the next wait arms a timer again
        if dl <= self._timer_at:
            w.set_exception(TimeoutError())
        else:  # the deadline moved on since this timer was armed
            self._timer_at = dl
            self._timer = self._loop.call_at(dl, self._on_timer)

    async def _read_head(self) -> None:
        while not self._headers_done:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    @property
    def at_eof(self) -> bool:
        """The whole body has arrived and was read: the next ``readany()`` returns ``b""`` at once."""
        return self._eof and not self._chunks

    async def readany(self) -> bytes:
        """What arrived since the last read (waiting for something); ``b""`` at the end of the body."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._size = 0
                conn = self._conn
                if conn is not None and conn.paused:
                    conn.resume()
                return data
            if self._eof:
                return b""
            if self._exc is not None:
                raise self._exc
            await self._wait()

    async def read(self) -> bytes:
        """The whole (rest of the) body."""
        while not self._eof:
            if self._exc is not None:
                raise self._exc
            conn = self._conn
            if conn is not None and conn.paused:
                conn.resume()
            await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data

    def close(self) -> None:
        """Done with this response: a connection still carrying its body is closed (the request aborts)."""
        self._stop_timer()
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.resp = None
            conn.close()
        if not self._eof and self._exc is None:
            self._exc = UpstreamBrokenError("the response was closed")

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the connection's side

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._conn = None
        if not self._eof and self._exc is None:
            self._exc = exc
        self._stop_timer()
        self._wake()

    def _finish(self) -> None:
        self._conn = None
        self._eof = True
        self._stop_timer()
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a replica: sends requests, feeds the answers to httptools."""

    def __init__(self, session: UpstreamSession, key: tuple[str, str, int]) -> None:
        self.session = session
        self.key = key
        self.loop = session.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: UpstreamResponse | None = None
        self.closed = False
        self.paused = False
        # Counted in the session's connections in use.
        self.busy = False
        self.reused = False
        self.keep_alive = False
        self.idle_until = 0.0
        self._complete = False
        self._skip = False  # inside a 1xx interim response

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # An asyncio.Transport in behaviour (uvloop's transports do not subclass it).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:
            # Bytes on an idle connection (nothing was asked): it cannot be trusted any more.
            self.close()
            return
        resp._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.resp = None
            self.close()
            resp._fail(UpstreamProtocolError(f"invalid HTTP response: {e}"))
            return
        if self._complete:
            self._complete = False
            self.resp = None
            if self.paused:
                self.resume()
            resp._finish()
            if self.keep_alive and not self.closed:
                self.session._release(self)
            else:
                self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.session._forget(self)
        self.closed = True
        resp = self.resp
        self.resp = None
        if resp is None:
            return
        if resp._headers_done and resp._close_delimited and exc is None:
            resp._finish()  # the body ran until the connection's close
            return
        what = "closed" if exc is None else f"failed ({type(exc).__name__})"
        before = not resp._got_bytes
        where = "before answering" if before else "mid-response"
        resp._fail(UpstreamBrokenError(f"the replica's connection {what} {where}", before_response=before))

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._skip:
            return
        resp = self.resp
        assert resp is not None
        resp.raw_headers.append((name, value))
        if len(name) == 12 and resp._content_type is None and name.lower() == b"content-type":
            resp._content_type = value  # the one header every answer is asked for

    def on_headers_complete(self) -> None:
        resp = self.resp
        assert resp is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._skip = True  # an interim answer: the real one follows
            resp.raw_headers = []
            resp._headers = None
            resp._content_type = None
            return
        resp.status = status
        self.keep_alive = keep = self.parser.should_keep_alive()
        resp._close_delimited = (
            not keep
            and resp.header(b"content-length") is None
            and resp.header(b"transfer-encoding") is None
            and status not in (204, 304)
        )
        resp._headers_done = True
        resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        assert resp is not None
        resp._chunks.append(body)
        resp._size += len(body)
        if resp._size > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        resp._wake()

    def on_message_complete(self) -> None:
        if self._skip:
            self._skip = False
            return
        self._complete = True

    # -- ours

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.session._forget(self)
            if self.transport is not None:
                self.transport.close()


class UpstreamSession:
    """Keep-alive connections to one pool's replicas (keyed by scheme, host and port)."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_timeout: float,
        connect_timeout: float,
        pool_timeout: float,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit = max_connections
        self.keepalive = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.acquire_timeout = pool_timeout + connect_timeout
        self._auth_line = b""
        if basic_auth is not None:
            token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode("ascii")
            self._auth_line = f"Authorization: Basic {token}\r\n".encode("latin-1")
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._conns: set[_Connection] = set()
        self._busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._cleanup: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None
        self.closed = False

    # -- requests

    def _target(self, url: str) -> _Target:
        t = self._targets.get(url)
        if t is None:
            if len(self._targets) > 4096:
                self._targets.clear()
            t = self._targets[url] = _Target(url, self._auth_line)
        return t

    async def request(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; returns once the response's headers arrived (its body is read from it)."""
        target = self._target(url)
        head = target.heads.get(method) or target.head(method)
        if headers:
            lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
            n = len(headers)
            if lines.count("\n") != n or lines.count("\r") != n:
                raise ValueError("an upstream header name or value holds a line break")
        else:
            lines = ""
        if body or method in _BODY_METHODS:
            lines += f"Content-Length: {len(body)}\r\n"
        data = head + (lines + "\r\n").encode("latin-1") + body
        conn = await self._acquire(target, deadline, fresh=False)
        resp = self._send(conn, data, deadline)
        try:
            await resp._read_head()
        except UpstreamBrokenError as e:
            resp.close()
            if not (conn.reused and e.before_response):
                raise
            # A stale keep-alive connection (the replica closed it as we reused it): once more, fresh.
            conn = await self._acquire(target, deadline, fresh=True)
            resp = self._send(conn, data, deadline)
            try:
                await resp._read_head()
            except BaseException:
                resp.close()
                raise
        except BaseException:
            resp.close()
            raise
        return resp

    def _send(self, conn: _Connection, data: bytes, deadline: float | None) -> UpstreamResponse:
        resp = UpstreamResponse(conn, deadline)
        if conn.closed or conn.transport is None:
            resp._fail(UpstreamBrokenError("the replica closed the connection at once", before_response=True))
            return resp
        conn.resp = resp
        conn.transport.write(data)
        return resp

    # -- the pool

    async def _acquire(self, target: _Target, deadline: float | None, fresh: bool) -> _Connection:
        if self.closed:
            raise UpstreamConnectError("the upstream session is closed")
        if self._busy >= self.limit:
            await self._wait_for_slot(deadline)
        if not fresh:
            idle = self._idle.get(target.key)
            if idle:
                now = self.loop.time()
                while idle:
                    conn = idle.pop()
                    if not conn.closed and conn.idle_until > now:
                        conn.busy = True
                        conn.reused = True
                        self._busy += 1
                        return conn
                    conn.close()
        self._busy += 1
        try:
            conn = await self._connect(target, deadline)
        except BaseException:
            self._busy -= 1
            self._wake_one()
            raise
        return conn

    async def _wait_for_slot(self, deadline: float | None) -> None:
        until = self.loop.time() + self.acquire_timeout
        if deadline is not None and deadline < until:
            until = deadline
        while self._busy >= self.limit:
            fut = self.loop.create_future()
            self._waiters.append(fut)
            timer = self.loop.call_at(until, _expire, fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._wake_one()  # woken but leaving: pass the turn on
                raise
            finally:
                timer.cancel()
                if not fut.done():
                    fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass

    def _wake_one(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _connect(self, target: _Target, deadline: float | None) -> _Connection:
        loop = self.loop
        until = loop.time() + self.connect_timeout
        if deadline is not None and deadline < until:
            until = deadline
        ctx = None
        if target.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        try:
            async with asyncio.timeout_at(until):
                _, proto = await loop.create_connection(
                    lambda: _Connection(self, target.key), target.host, target.port, ssl=ctx
                )
        except TimeoutError:
            raise ConnectTimeoutError(f"connect to {target.host}:{target.port} timed out") from None
        except OSError as e:
            raise UpstreamConnectError(f"cannot connect to {target.host}:{target.port}: {e}") from None
        if proto.closed or self.closed:
            proto.close()
            raise UpstreamConnectError(f"the connection to {target.host}:{target.port} closed at once")
        proto.busy = True
        self._conns.add(proto)
        return proto

    def _release(self, conn: _Connection) -> None:
        """A complete response gave its connection back: idle until reused or expired."""
        if conn.busy:
            conn.busy = False
            self._busy -= 1
        if self.closed:
            conn.close()
            return
        conn.idle_until = self.loop.time() + self.keepalive
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if self._cleanup is None:
            self._cleanup = self.loop.call_at(conn.idle_until, self._drop_expired)
        if self._waiters:
            self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        """A connection closed (either side): out of the pool, its slot free."""
        if conn.busy:
            conn.busy = False
            self._busy -= 1
            self._wake_one()
        self._conns.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _drop_expired(self) -> None:
        self._cleanup = None
        now = self.loop.time()
        soonest = None
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_until <= now]:
                conn.close()
            for conn in idle:
                if soonest is None or conn.idle_until < soonest:
                    soonest = conn.idle_until
        if soonest is not None:
            self._cleanup = self.loop.call_at(soonest, self._drop_expired)

    def idle_connections(self) -> int:
        """How many connections sit idle in the pool (for tests and metrics)."""
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        self.closed = True
        if self._cleanup is not None:
            self._cleanup.cancel()
            self._cleanup = None
        for conn in list(self._conns):
            conn.close()
        self._idle.clear()
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(UpstreamConnectError("the upstream session is closed"))
        self._waiters.clear()


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(PoolTimeoutError("no upstream connection became free in time"))


def make_session(cfg: ModelConfig) -> UpstreamSession:
    """The pool's client (call inside the running loop)."""
    t = cfg.timeouts
    return UpstreamSession(
        max_connections=cfg.max_connections,
        # Shorter than the engine's own idle timeout (uvicorn's default is 5 s): reusing a connection the
        # server is closing at that moment fails (seen on the H200 run; such a failure is retried once).
        keepalive_timeout=cfg.keepalive_timeout,
        connect_timeout=t.connect,
        pool_timeout=t.pool,
        basic_auth=cfg.upstream_basic_auth,
    )
