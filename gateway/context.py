"""Per-request state carried through the request path and handed to observers (audit, metrics, quota)."""

from __future__ import annotations

import itertools
import os
import re
import time
from typing import Any

from gateway.auth.principal import Principal
from gateway.outcome import Ending, Outcome, classify

# Unique ids without a system call each: 48 random bits drawn once per process (again in a forked worker),
# then a counter. Request ids keep their shape (``req-`` + 24 hex digits); quota leases must only be unique
# among every replica's live leases (a Redis set), which the per-process random prefix makes them.
_prefix = os.urandom(6).hex()
_counter = itertools.count(1)


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(6).hex()
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    return f"req-{_prefix}{next(_counter):012x}"


def unique_id() -> str:
    """A short id unique among every process's ids (quota leases)."""
    return f"{_prefix}{next(_counter):x}"


_CLIENT_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def client_request_id(raw: bytes | None, max_chars: int = 128) -> str | None:
    """A client's ``X-Request-Id`` if it is 1..max_chars of ``[A-Za-z0-9._:-]``; anything else is dropped."""
    if not raw or len(raw) > max_chars:
        return None
    try:
        value = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return value if _CLIENT_ID_OK.fullmatch(value) else None


def response_request_id(ctx: RequestContext) -> bytes:
    """The ``x-request-id`` sent back: the client's own when it sent a valid one, else ours."""
    return (ctx.client_request_id or ctx.request_id).encode()


class RequestContext:
    """Everything known about one request. Mutable, one per request, never shared between requests."""

    __slots__ = (
        "request_id",
        "route",
        "method",
        "client_ip",
        "started",
        "started_wall",
        "principal",
        "model",
        "stream",
        "client_wants_usage",
        "max_tokens",
        "prompt_chars",
        "body",
        "status",
        "decision",
        "reason",
        "error_message",
        "endpoint",
        "attempts",
        "prompt_tokens",
        "completion_tokens",
        "ttfb",
        "ttft",
        "first_token_at",
        "last_chunk_at",
        "chunk_gaps",
        "forwarded_at",
        "finished",
        "bytes_in",
        "bytes_out",
        "client_gone",
        "response_headers",
        "extra",
        "upstream_errors",
        "ending",
        "client_request_id",
    )

    def __init__(
        self, request_id: str, route: str, method: str = "POST", client_ip: str | None = None
    ) -> None:
        # Ours, always generated: the audit event id, forwarded to the engine.
        self.request_id = request_id
        # The client's X-Request-Id when it is well formed (see client_request_id()), echoed back and
        # recorded as audit http.request.id; never our event id.
        self.client_request_id: str | None = None
        self.route = route
        self.method = method
        self.client_ip = client_ip
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.principal: Principal | None = None
        self.model: str | None = None
        self.stream = False
        self.client_wants_usage = False
        self.max_tokens: int | None = None
        self.prompt_chars = 0
        # The parsed request body (dict) once read; observers may read it (audit content policy).
        self.body: dict[str, Any] | None = None
        self.status = 0
        # The outcome label (gateway/outcome.py), set once when the request ends from ``ending``.
        self.decision: Outcome = Outcome.ALLOWED
        self.reason: str | None = None
        self.error_message: str | None = None
        self.endpoint: str | None = None
        self.attempts = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        # Seconds from start to upstream response headers / first streamed content chunk.
        self.ttfb: float | None = None
        self.ttft: float | None = None
        self.first_token_at: float | None = None
        self.last_chunk_at: float | None = None
        # Gaps between streamed content chunks (seconds): inter-token latency samples.
        self.chunk_gaps: list[float] = []
        # perf_counter() when the request was handed to the upstream (gateway overhead = this - started).
        self.forwarded_at: float | None = None
        self.finished: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.client_gone = False
        # Headers added to the response to the client (rate limits, ...).
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.extra: dict[str, Any] = {}
        # One entry per upstream fault, retried or not: connect | timeout | http_5xx | stream_broken |
        # stream_idle_timeout | broken | no_healthy_replica (metrics count them by kind).
        self.upstream_errors: list[str] = []
        # How the request ended when not normally (the first ending recorded wins); see gateway/outcome.py.
        self.ending: Ending | None = None

    def end(self, ending: Ending) -> None:
        """Record how the request ended, unless an earlier ending was already recorded."""
        if self.ending is None:
            self.ending = ending

    def classify(self) -> None:
        """Set the outcome label and reason from the recorded ending (once, when the request ends)."""
        self.decision, reason = classify(self.ending)
        self.reason = self.reason or reason

    @property
    def duration(self) -> float:
        end = self.finished if self.finished is not None else time.perf_counter()
        return end - self.started

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)
