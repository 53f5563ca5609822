"""How a request ended, and the one classifier that turns that into its outcome label.

The request path records *what happened* (an ``Ending``) where it happens: an ApiError sent to the client,
an engine's non-200 answer passed on, a stream that ended badly, a client that left. ``classify`` is the
only place that maps an ending to the ``Outcome`` that metrics and audit record (``ctx.decision``) and its
short reason; the first ending recorded wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import ApiError


class Outcome(StrEnum):
    ALLOWED = "allowed"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    UPSTREAM_ERROR = "upstream_error"
    OVERLOADED = "overloaded"
    CLIENT_CLOSED = "client_closed"


class StreamEnd(StrEnum):
    """A relayed stream that did not end with the engine's own ``[DONE]``; the value is the reason."""

    DRAIN_DEADLINE = "drain_deadline"
    IDLE_TIMEOUT = "stream_idle_timeout"
    TOTAL_TIMEOUT = "stream_total_timeout"
    BROKEN = "stream_broken"
    TRUNCATED = "stream_truncated"


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """The engine answered with this non-200 status and the gateway passed the answer on."""

    status: int


class ClientGone:
    """The client went away before the response ended."""


CLIENT_GONE = ClientGone()

Ending = ApiError | UpstreamStatus | StreamEnd | ClientGone

_BY_STATUS = {
    401: Outcome.UNAUTHENTICATED,
    403: Outcome.FORBIDDEN,
    404: Outcome.NOT_FOUND,
    429: Outcome.RATE_LIMITED,
    502: Outcome.UPSTREAM_ERROR,
    504: Outcome.UPSTREAM_ERROR,
}


def _for_error(e: ApiError) -> Outcome:
    if e.reason == "auth_unavailable":
        # The identity provider's keys could not be had (fail closed): the caller is not authenticated.
        return Outcome.UNAUTHENTICATED
    known = _BY_STATUS.get(e.status)
    if known is not None:
        return known
    if e.status == 503:
        return Outcome.UPSTREAM_ERROR if e.reason == "upstream_error" else Outcome.OVERLOADED
    return Outcome.UPSTREAM_ERROR if e.status >= 500 else Outcome.INVALID_REQUEST


def classify(ending: Ending | None) -> tuple[Outcome, str | None]:
    """The outcome label and reason for how a request ended (None: it completed normally)."""
    if ending is None:
        return Outcome.ALLOWED, None
    if isinstance(ending, ApiError):
        return _for_error(ending), ending.reason
    if isinstance(ending, UpstreamStatus):
        bad = Outcome.UPSTREAM_ERROR if ending.status >= 500 else Outcome.INVALID_REQUEST
        return bad, f"upstream_{ending.status}"
    if isinstance(ending, StreamEnd):
        return (
            Outcome.OVERLOADED if ending is StreamEnd.DRAIN_DEADLINE else Outcome.UPSTREAM_ERROR
        ), ending.value
    return Outcome.CLIENT_CLOSED, None
