"""Stage two of a streamed attempt: relay the engine's events to the client as they come.

Complete events only are forwarded (a partial trailing event waits for the next read); the usage chunk is
read and, when the client did not ask for it, hidden. From here on nothing is retried: a fault ends the
stream with an OpenAI-style error event and ``[DONE]``, bounded by the idle gap between chunks and the
total timeout. When the gateway's drain deadline passes, the stream ends the same way (code ``draining``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.context import RequestContext
from gateway.errors import sse_error_event
from gateway.outcome import StreamEnd
from gateway.proxy.respond import Send, start_stream
from gateway.proxy.sse import DONE_EVENT, USAGE_KEY, ends_with_done, split_complete, take_usage
from gateway.responses_api import ResponsesStream
from gateway.routes import usage_tokens
from gateway.upstream import UpstreamError, UpstreamResponse


class _DrainDeadline(Exception):
    """The gateway's drain deadline passed while this stream was still running."""


class DrainFlag(Protocol):
    """Whatever says that the gateway's drain deadline passed (the GatewayState)."""

    drain_expired: bool


@dataclass(slots=True, init=False)  # one per request: plain attribute stores (a frozen init costs more)
class StreamLimits:
    idle: float
    total_at: float | None
    drain: DrainFlag

    # Written out (init=False): a generated __init__ would run as interpreted code in a compiled module.
    def __init__(self, idle: float, total_at: float | None, drain: DrainFlag) -> None:
        self.idle = idle
        self.total_at = total_at
        self.drain = drain


_TAILS = {
    StreamEnd.DRAIN_DEADLINE: (
        "The gateway is shutting down and could not finish this stream in time; retry.",
        "service_unavailable",
        "draining",
    ),
    StreamEnd.TOTAL_TIMEOUT: (
        "The request ran past its total time limit.",
        "timeout_error",
        "upstream_timeout",
    ),
    StreamEnd.IDLE_TIMEOUT: (
        "The model server stopped sending (idle timeout).",
        "timeout_error",
        "upstream_timeout",
    ),
    StreamEnd.TRUNCATED: (
        "The model server ended the stream early.",
        "upstream_error",
        "upstream_disconnected",
    ),
}

# The router's fault kind for each way a stream can end badly (a drain deadline is not the replica's fault).
FAULT_OF = {
    StreamEnd.IDLE_TIMEOUT: "timeout",
    StreamEnd.TOTAL_TIMEOUT: "timeout",
    StreamEnd.BROKEN: "broken",
    StreamEnd.TRUNCATED: "broken",
}


def _tail(end: StreamEnd, error: BaseException | None = None) -> bytes:
    if end is StreamEnd.BROKEN:
        name = type(error).__name__ if error is not None else "error"
        return sse_error_event(
            f"The model server broke the stream ({name}).", "upstream_error", "upstream_disconnected"
        )
    message, type_, code = _TAILS[end]
    return sse_error_event(message, type_, code)


class _Relay:
    """One stream's relay state: the request context, where events go, and whether usage is hidden.

    A Responses API stream (``typed``) is relayed as it is: its typed events carry the response id (in
    ``response.created``) and the usage (in the terminal event, which also marks a complete stream: it has
    no ``[DONE]``)."""

    __slots__ = ("ctx", "send", "hide_usage", "saw_done", "typed", "on_response_id", "id_seen")

    def __init__(
        self,
        ctx: RequestContext,
        send: Send,
        typed: ResponsesStream | None = None,
        on_response_id: Callable[[str], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.send = send
        self.hide_usage = not ctx.client_wants_usage
        self.saw_done = False
        self.typed = typed
        self.on_response_id = on_response_id
        self.id_seen = False

    def _typed(self, events: bytes) -> bytes:
        typed = self.typed
        assert typed is not None
        typed.feed(events)
        if typed.response_id and not self.id_seen:
            self.id_seen = True
            if self.on_response_id is not None:
                self.on_response_id(typed.response_id)
        if typed.usage is not None:
            pt, ct = usage_tokens("responses", typed.usage)
            if pt is not None:
                self.ctx.prompt_tokens = pt
            if ct is not None:
                self.ctx.completion_tokens = ct
        self.saw_done = self.saw_done or typed.terminal is not None
        return events

    def usage(self, events: bytes) -> bytes:
        if self.typed is not None:
            return self._typed(events)
        events, usage = take_usage(events, self.hide_usage)
        if usage is not None:
            if usage.prompt_tokens is not None:
                self.ctx.prompt_tokens = usage.prompt_tokens
            if usage.completion_tokens is not None:
                self.ctx.completion_tokens = usage.completion_tokens
        return events

    def take(self, events: bytes) -> bytes:
        """Account for complete events about to go to the client (usage, first-token time, gaps, bytes);
        returns the bytes to send (without a hidden usage chunk; empty when nothing is left)."""
        if self.typed is not None or USAGE_KEY in events:  # the cheap test first: most events hold no usage
            events = self.usage(events)
            if not events:
                return b""
        ctx = self.ctx
        now = time.perf_counter()
        if ctx.first_token_at is None:
            ctx.first_token_at = now
            ctx.ttft = now - ctx.started
        elif ctx.last_chunk_at is not None:
            ctx.chunk_gaps.append(now - ctx.last_chunk_at)
        ctx.last_chunk_at = now
        ctx.bytes_out += len(events)
        if events.endswith(DONE_EVENT):
            self.saw_done = True
        return events

    async def events(self, events: bytes) -> None:
        data = self.take(events)
        if data:
            await self.send({"type": "http.response.body", "body": data, "more_body": True})

    def rest(self, buf: bytes) -> tuple[bytes, StreamEnd | None]:
        """The stream ended: what is left to send, and whether the end was premature."""
        if buf.strip():
            # The stream ended without a final blank line: pass on what is left as it is.
            buf = self.usage(buf)
            self.saw_done = self.saw_done or (self.typed is None and ends_with_done(buf))
        if self.saw_done:
            return buf, None
        return buf + _tail(StreamEnd.TRUNCATED), StreamEnd.TRUNCATED


async def _pump(
    relay: _Relay, resp: UpstreamResponse, buf: bytes, limits: StreamLimits
) -> tuple[bytes, bytes]:
    """Relay complete events until the engine ends the stream; returns (the unterminated rest, the last
    events, held back to go out together with the stream's end when the engine's answer had already
    ended as they were read: one write instead of two).

    Each read waits at most ``idle`` seconds (never past the total deadline): the response's ``deadline``
    is moved before every read, and its one timer re-arms itself only when it fires (gateway/upstream.py).
    Sending to the client is not bounded by it."""
    loop = asyncio.get_running_loop()
    idle, total_at, drain = limits.idle, limits.total_at, limits.drain
    while True:
        events, buf = split_complete(buf)
        if events:
            if not buf and resp.at_eof:
                return b"", relay.take(events)
            await relay.events(events)
        wake = loop.time() + idle
        resp.deadline = wake if total_at is None or wake < total_at else total_at
        chunk = await resp.readany()
        if not chunk:
            return buf, b""
        buf += chunk
        if drain.drain_expired:
            raise _DrainDeadline()


async def relay_stream(
    ctx: RequestContext,
    resp: UpstreamResponse,
    first: bytes,
    send: Send,
    limits: StreamLimits,
    typed: ResponsesStream | None = None,
    on_response_id: Callable[[str], None] | None = None,
) -> StreamEnd | None:
    """Relay a stream whose first event(s) are in ``first``. Returns None, or how the stream ended early
    (the client then got an error event and a clean end of the stream)."""
    await start_stream(ctx, resp.status, send)
    relay = _Relay(ctx, send, typed, on_response_id)
    end: StreamEnd | None
    held = b""
    try:
        rest, held = await _pump(relay, resp, first, limits)
    except _DrainDeadline:
        end, tail = StreamEnd.DRAIN_DEADLINE, _tail(StreamEnd.DRAIN_DEADLINE)
    except TimeoutError:
        total = limits.total_at is not None and asyncio.get_running_loop().time() >= limits.total_at
        end = StreamEnd.TOTAL_TIMEOUT if total else StreamEnd.IDLE_TIMEOUT
        ctx.upstream_errors.append("stream_idle_timeout")
        tail = _tail(end)
    except (UpstreamError, OSError) as e:
        end, tail = StreamEnd.BROKEN, _tail(StreamEnd.BROKEN, e)
        ctx.upstream_errors.append("stream_broken")
    else:
        tail, end = relay.rest(rest)
        if end is not None:
            ctx.upstream_errors.append("stream_broken")
    if end is not None:
        ctx.end(end)
    ctx.bytes_out += len(tail)
    await send({"type": "http.response.body", "body": held + tail if held else tail, "more_body": False})
    return end
