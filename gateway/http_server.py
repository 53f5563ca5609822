"""The HTTP/1.1 protocol the gateway serves with: uvicorn's httptools protocol plus limits on the request head.

uvicorn's httptools protocol accepts a request line and headers of any size and number, and waits for them
forever: a caller with no credential could hold megabytes per connection before the app ever runs. This
subclass, chosen by ``http="gateway.http_server:LimitedHttpToolsProtocol"`` in uvicorn's config, counts the
bytes and the header lines of each request head as they arrive and

- answers ``431`` and closes the connection once the head passes ``max_header_bytes`` or ``max_header_count``
  (the parser is dropped at once: nothing more is buffered);
- answers ``408`` and closes the connection when a head is not complete ``header_timeout`` seconds after its
  first byte (slow-loris on the headers);
- answers a malformed request (``400``) with an OpenAI-shaped JSON error body instead of uvicorn's plain text.

The limits are class attributes set once per process by :func:`configure` (each worker process calls it
when it builds its app from the environment). Measured against h11 with its own incomplete-event limit in
``scripts/bench_http_protocol.py``: the check costs a counter per chunk and a timer per request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

if TYPE_CHECKING:
    from gateway.settings import GatewaySettings

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_HEADER_COUNT = 100
DEFAULT_HEADER_TIMEOUT = 10.0


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


# The scope key under which a request finds its connection (LimitedHttpToolsProtocol.on_lost).
CONNECTION_KEY = "gateway.connection"


class _HeadTooLarge(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        # True from the end of one request's head (or the connection's start) until the next head is complete.
        self._in_head = True
        self._head_bytes = 0
        self._head_count = 0
        # Header lines and bytes of the request line and headers as parsed, when a check needed them (exact,
        # unlike ``_head_bytes``, which counts whole reads and so may include the start of a body).
        self._head_parsed = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._rejected = False
        # Called once when the client's connection goes away (the proxy's disconnect watch, see on_lost()).
        self._on_lost: Callable[[], None] | None = None

    # -- the byte stream ----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_timer is None and self.header_timeout > 0:
                self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No WebSocket routes: an upgrade request is answered like any other request (the app says 404).
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
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, message, code))
            self.transport.close()
        # Drop what the parser holds of the head now, not when the connection object goes away.
        self.parser = httptools.HttpRequestParser(self)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self._rejected:
            self._reject(408, "The request headers were not received in time.", "request_timeout")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)
        cb, self._on_lost = self._on_lost, None
        if cb is not None:
            cb()

    def on_lost(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` if the connection is lost before ``on_lost(None)``: the proxy watches for a
        client that leaves this way instead of with a task blocked on ``receive()`` per request."""
        self._on_lost = callback

    def send_400_response(self, msg: str) -> None:
        self._reject(400, "Invalid HTTP request received.", "invalid_http_request")

    # -- parser callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self._in_head:
            # A pipelined request starting inside the same chunk: its first bytes were not counted.
            self._in_head = True
            self._head_bytes = 0
        self._head_count = self._head_parsed = 0
        super().on_message_begin()
        self.scope[CONNECTION_KEY] = self  # type: ignore[literal-required]

    # No per-header callback of ours: the count and, for a head that came in one large read, the exact size
    # are checked once the head is complete (an unfinished head is bounded in data_received).
    def on_headers_complete(self) -> None:
        if len(self.headers) > self.max_header_count:
            self._head_count = len(self.headers)
            raise _HeadTooLarge
        if self._head_bytes > self.max_header_bytes:
            self._head_parsed = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
            if self._head_parsed > self.max_header_bytes:
                raise _HeadTooLarge
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # The next bytes on this connection begin a new head.
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()


def configure(max_header_bytes: int, max_header_count: int, header_timeout: float) -> None:
    """Sets the limits for every connection this process accepts from now on."""
    LimitedHttpToolsProtocol.max_header_bytes = max_header_bytes
    LimitedHttpToolsProtocol.max_header_count = max_header_count
    LimitedHttpToolsProtocol.header_timeout = header_timeout


PROTOCOL = "gateway.http_server:LimitedHttpToolsProtocol"


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
