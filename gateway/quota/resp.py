"""A lean Redis client for the quota hot path: RESP2 over persistent asyncio connections, pipelined.

Redis executes one command at a time, so a request does not need a connection of its own: commands are
written in order on one long-lived connection (or a few, round robin) and the replies, which Redis sends in
the same order, are matched first-in first-out to the waiting futures. Commands issued in the same event-loop
iteration go out in one ``write``. Replies are parsed by ``hiredis.Reader`` (redis-py's C parser).

- **Scripts**: ``EVALSHA`` with the SHA1 computed here; on ``NOSCRIPT`` (Redis restarted and lost its script
  cache) the same call is sent once as ``EVAL``, which also caches the script again.
- **URLs**: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS, verified against the system CA
  store; ``?ssl_cert_reqs=none|optional|required`` and ``?ssl_ca_certs=PATH`` as redis-py reads them) and
  ``unix://[[user]:password@]/path.sock[?db=N]``. ``AUTH`` and ``SELECT`` are sent on every (re)connect.
- **Timeouts**: a connect timeout, and a reply timeout per command. Replies come back in order, so only the
  oldest pending command's deadline is watched (one timer per connection, re-armed about once per timeout
  period under load, not one per command). A late reply poisons the order of every later one: the connection
  is closed and every pending command fails with :class:`RedisTimeoutError`.
- **Failures**: a lost connection fails every pending command with :class:`RedisConnectionError`; the next
  command opens a new connection. Commands are never retried here (the caller decides: quota admission falls
  back or refuses, and replays settlements later). At most ``max_pending`` commands wait per connection;
  beyond that a command fails at once with :class:`RedisBusyError`.

Every error is a :class:`RedisError` (timeouts are also ``TimeoutError``, connection failures also
``ConnectionError``), so ``except RedisError`` catches all of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

__all__ = [
    "RedisAddress",
    "RedisBusyError",
    "RedisClient",
    "RedisConnectionError",
    "RedisError",
    "RedisTimeoutError",
    "ResponseError",
    "Script",
    "bulk",
    "pack",
    "parse_url",
]

Arg = bytes | str | int | float


class RedisError(Exception):
    """Any failure of a Redis command: an error reply, a lost or refused connection, a timeout."""


class ResponseError(RedisError):
    """Redis answered with an error reply (``-ERR ...``, ``-NOSCRIPT ...``); the connection stays usable."""


class RedisConnectionError(RedisError, ConnectionError):
    """The connection could not be opened, or was lost with commands pending."""


class RedisTimeoutError(RedisError, TimeoutError):
    """No reply (or no connection) within the timeout."""


class RedisBusyError(RedisError):
    """Too many commands already wait for Redis on this connection."""


# -- encoding -----------------------------------------------------------------------------------------------


def bulk(value: Arg) -> bytes:
    """One RESP bulk string: ``$<len>\\r\\n<bytes>\\r\\n``."""
    if isinstance(value, bytes):
        b = value
    elif isinstance(value, str):
        b = value.encode()
    elif isinstance(value, bool):
        raise TypeError("booleans are not Redis arguments")
    elif isinstance(value, int):
        b = b"%d" % value
    elif isinstance(value, float):
        b = repr(value).encode()
    else:
        raise TypeError(f"unsupported Redis argument type {type(value).__name__}")
    return b"$%d\r\n%s\r\n" % (len(b), b)


def pack(*args: Arg) -> bytes:
    """One command as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


class Script:
    """A Lua script called by SHA1 (``EVALSHA``), re-sent as ``EVAL`` when Redis does not know it."""

    __slots__ = ("text", "sha", "_heads")

    def __init__(self, text: str) -> None:
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest().encode()
        self._heads: dict[tuple[int, bool], bytes] = {}

    def head(self, nparts: int, by_sha: bool = True) -> bytes:
        """``*<n>\\r\\n`` + ``EVALSHA <sha>`` (or ``EVAL <text>``) for a call whose numkeys, keys and args
        are ``nparts`` bulk strings."""
        h = self._heads.get((nparts, by_sha))
        if h is None:
            h = b"*%d\r\n" % (nparts + 2) + (
                bulk(b"EVALSHA") + bulk(self.sha) if by_sha else bulk(b"EVAL") + bulk(self.text)
            )
            self._heads[(nparts, by_sha)] = h
        return h


# -- addresses ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host:port
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ssl_cert_reqs: str = "required"
    ssl_ca_certs: str | None = None

    def describe(self) -> str:
        """Where, without credentials (for errors and logs)."""
        where = self.path if self.path is not None else f"{self.host}:{self.port}"
        return f"{'rediss' if self.tls else 'redis'} {where} db {self.db}"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_ca_certs)
        if self.ssl_cert_reqs == "none":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ssl_cert_reqs == "optional":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


def parse_url(url: str) -> RedisAddress:
    """A Redis URL as redis-py accepts the common forms; ``ValueError`` naming what is wrong (never the
    password)."""
    try:
        u = urlsplit(url)
        scheme = u.scheme.lower()
        query = {k: v[-1] for k, v in parse_qs(u.query).items()}
        username = unquote(u.username) if u.username else None
        password = unquote(u.password) if u.password is not None else None
        port = u.port
    except ValueError as e:
        raise ValueError(f"redis URL is malformed ({e})") from None
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis URL scheme must be redis://, rediss:// or unix://, got {scheme or 'none'!r}")
    unknown = set(query) - {"db", "ssl_cert_reqs", "ssl_ca_certs"}
    if unknown:
        raise ValueError(f"redis URL has unsupported query parameters: {', '.join(sorted(unknown))}")
    db_text = query.get("db")
    if scheme != "unix" and u.path not in ("", "/"):
        db_text = u.path.lstrip("/")
    try:
        db = int(db_text) if db_text is not None else 0
        if db < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"redis URL database must be a number >= 0, got {db_text!r}") from None
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("none", "optional", "required"):
        raise ValueError(f"redis URL ssl_cert_reqs must be none, optional or required, got {reqs!r}")
    if scheme == "unix":
        if not u.path:
            raise ValueError("redis URL unix:// needs a socket path (unix:///run/redis.sock)")
        return RedisAddress(path=u.path, db=db, username=username, password=password)
    if not u.hostname:
        raise ValueError("redis URL has no host")
    return RedisAddress(
        host=u.hostname,
        port=port or 6379,
        db=db,
        username=username,
        password=password,
        tls=scheme == "rediss",
        ssl_cert_reqs=reqs,
        ssl_ca_certs=query.get("ssl_ca_certs"),
    )


# -- one connection -----------------------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """Commands out in order, replies matched FIFO to futures; one timer for the oldest pending deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, max_pending: int, where: str) -> None:
        self.loop = loop
        self.timeout = timeout
        self.max_pending = max_pending
        self.where = where
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    # transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        pending = self.pending
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as e:
                self.fail(RedisConnectionError(f"Redis protocol error from {self.where}: {e}"))
                return
            if reply is False:
                return
            if not pending:
                self.fail(RedisConnectionError(f"unexpected reply from {self.where}"))
                return
            fut = pending.popleft()[0]
            if fut.done():
                continue  # its caller was cancelled; the reply still had to be consumed in order
            if isinstance(reply, ResponseError):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc else ""
        self.fail(RedisConnectionError(f"connection to {self.where} lost{why}"))

    # sending

    def send(self, data: bytes, n: int = 1) -> list[asyncio.Future[Any]]:
        """Queue ``data`` (``n`` commands); one future per reply. Raises when the connection cannot take them."""
        if self.closed:
            raise RedisConnectionError(f"connection to {self.where} is closed")
        pending = self.pending
        if len(pending) + n > self.max_pending:
            raise RedisBusyError(f"{len(pending)} commands already wait for {self.where}")
        loop = self.loop
        deadline = loop.time() + self.timeout
        futs = []
        for _ in range(n):
            fut = loop.create_future()
            pending.append((fut, deadline))
            futs.append(fut)
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self.flush)
        if self.timer is None:
            self.timer = loop.call_at(deadline, self.check_deadline)
        return futs

    def flush(self) -> None:
        self.flush_scheduled = False
        out = self.out
        if not out or self.closed or self.transport is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.transport.write(data)

    def check_deadline(self) -> None:
        self.timer = None
        if not self.pending or self.closed:
            return
        deadline = self.pending[0][1]
        if deadline <= self.loop.time():
            self.fail(RedisTimeoutError(f"no reply from {self.where} within {self.timeout:g} s"))
        else:
            self.timer = self.loop.call_at(deadline, self.check_deadline)

    def fail(self, exc: RedisError) -> None:
        """Close the connection and fail every pending command with ``exc``."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()
        pending = self.pending
        while pending:
            fut = pending.popleft()[0]
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # nobody may wait any more (a cancelled caller): never "exception never retrieved"


# -- the client ---------------------------------------------------------------------------------------------


class RedisClient:
    """Pipelined commands over ``connections`` persistent connections (opened on first use, reopened after a
    failure). Safe to create outside an event loop; bound to the loop of its first command."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 1.0,
        connect_timeout: float | None = None,
        connections: int = 1,
        max_pending: int = 4096,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be >= 1")
        self.address = parse_url(url)
        self.where = self.address.describe()
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self.max_pending = max_pending
        self._ssl = self.address.ssl_context()
        self._conns: list[_Connection | None] = [None] * connections
        self._connecting: list[asyncio.Task[_Connection] | None] = [None] * connections
        self._next = 0
        self._closed = False

    # connections

    def _slot(self) -> int:
        n = len(self._conns)
        if n == 1:
            return 0
        i = self._next
        self._next = (i + 1) % n
        return i

    async def _connection(self, i: int) -> _Connection:
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        task = self._connecting[i]
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open())
            self._connecting[i] = task
            task.add_done_callback(lambda t: self._opened(i, t))
        return await asyncio.shield(task)

    def _opened(self, i: int, task: asyncio.Task[_Connection]) -> None:
        self._connecting[i] = None
        if task.cancelled() or task.exception() is not None:
            return  # the callers got the error; the next command tries again
        conn = task.result()
        if self._closed:
            conn.fail(RedisConnectionError("the Redis client is closed"))
        else:
            self._conns[i] = conn

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        a = self.address

        def factory() -> _Connection:
            return _Connection(loop, self.timeout, self.max_pending, self.where)

        try:
            async with asyncio.timeout(self.connect_timeout):
                if a.path is not None:
                    _, conn = await loop.create_unix_connection(factory, a.path)
                else:
                    _, conn = await loop.create_connection(
                        factory, a.host, a.port, ssl=self._ssl, server_hostname=a.host if self._ssl else None
                    )
        except TimeoutError:
            raise RedisTimeoutError(
                f"cannot connect to {self.where} within {self.connect_timeout:g} s"
            ) from None
        except OSError as e:
            raise RedisConnectionError(f"cannot connect to {self.where}: {e.strerror or e}") from None
        hello: list[bytes] = []
        if a.password is not None:
            hello.append(pack("AUTH", a.username, a.password) if a.username else pack("AUTH", a.password))
        if a.db:
            hello.append(pack("SELECT", a.db))
        if hello:
            futs = conn.send(b"".join(hello), len(hello))
            try:
                for f in futs:
                    await f
            except ResponseError as e:
                conn.fail(RedisConnectionError(f"{self.where} refused the connection setup: {e}"))
                raise RedisConnectionError(f"{self.where} refused the connection setup: {e}") from None
        return conn

    # commands

    async def send(self, data: bytes, n: int = 1) -> list[asyncio.Future[Any]]:
        """Write ``n`` packed commands in one go (nothing can come between them); their reply futures."""
        i = self._slot()
        conn = self._conns[i]
        if conn is None or conn.closed:
            conn = await self._connection(i)
        return conn.send(data, n)

    async def execute(self, *args: Arg) -> Any:
        """One command; its reply (``bytes``, ``int``, ``list``, ``None``), or ``ResponseError`` raised."""
        (fut,) = await self.send(pack(*args))
        return await fut

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several commands written together; their replies in order (an error reply raises)."""
        futs = await self.send(b"".join(pack(*c) for c in commands), len(commands))
        out: list[Any] = []
        error: BaseException | None = None
        for f in futs:  # every reply is awaited, so no error goes unretrieved
            try:
                out.append(await f)
            except ResponseError as e:
                error = error or e
                out.append(e)
        if error is not None:
            raise error
        return out

    async def transaction(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """``MULTI``, the commands, ``EXEC``, written together: the replies of the commands."""
        res = await self.pipeline([("MULTI",), *commands, ("EXEC",)])
        out = res[-1]
        if out is None:
            raise ResponseError("EXEC aborted")
        for r in out:
            if isinstance(r, ResponseError):
                raise r
        return list(out)

    async def evalsha(self, script: Script, body: bytes, nparts: int) -> Any:
        """Run ``script`` with ``body``: numkeys, keys and args already packed as ``nparts`` bulk strings."""
        (fut,) = await self.send(script.head(nparts) + body)
        try:
            return await fut
        except ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        (fut,) = await self.send(script.head(nparts, by_sha=False) + body)
        return await fut

    async def close(self) -> None:
        self._closed = True
        for t in self._connecting:
            if t is not None:
                t.cancel()
        for c in self._conns:
            if c is not None and not c.closed:
                c.fail(RedisConnectionError("the Redis client is closed"))
        self._conns = [None] * len(self._conns)
