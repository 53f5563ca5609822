"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the gateway produces goes through :class:`ApiError`, so clients (the OpenAI SDK included) see
the same structure and status codes they would from OpenAI itself. Never a stack trace.
"""

from __future__ import annotations

import json

# OpenAI's error "type" per HTTP status, as their API and vLLM's server use them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error that is sent to the client as an OpenAI-shaped JSON body with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        # Short machine-readable reason for audit/metrics (unauthenticated, forbidden, rate_limited, ...).
        self.reason = reason or self.code or self.type

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}},
        ensure_ascii=False,
    ).encode()


def sse_error_event(message: str, type: str = "upstream_error", code: str | None = None) -> bytes:
    """An OpenAI-style error event for a stream that cannot continue, followed by the end marker."""
    payload = error_body(message, type, None, code)
    return b"data: " + payload + b"\n\ndata: [DONE]\n\n"
