"""The audit record of one request: an ECS-style JSON object (Elastic indexes it without mapping work).

ECS fields where ECS has one (``@timestamp``, ``event.*``, ``user.id``, ``organization.id``, ``client.ip``,
``http.request.*``, ``http.response.*``, ``url.path``), plus our own ``llm.*`` namespace::

    {"@timestamp": "2026-11-29T10:47:24.123Z",              # request start (UTC)
     "ecs": {"version": "8.11.0"},
     "event": {"kind": "event", "category": ["web"], "type": ["access"|"denied"|"error"],
               "action": "/v1/chat/completions", "outcome": "success"|"failure",
               "start": ..., "end": ..., "duration": <nanoseconds>, "id": <request id>},
     "user": {"id": <subject>}, "organization": {"id": <tenant>},
     "client": {"ip": "127.0.0.1"},
     "http": {"request": {"id": <request id>, "method": "POST", "bytes": <body bytes>},
              "response": {"status_code": 200, "bytes": <bytes sent>}},
     "url": {"path": "/v1/chat/completions"},
     "llm": {"model": "tiny", "upstream": "http://10.0.0.5:8000", "attempts": 1,
             "decision": "allowed", "reason": null, "stream": true, "max_tokens": 64,
             "usage": {"prompt_tokens": 12, "completion_tokens": 64, "total_tokens": 76},
             "ttft_ms": 41.2, "duration_ms": 913.0, "auth": {"kind": "api_key", "key_id": "team-a-1"},
             "prompt": {"sha256": ...} | {"messages": [{"role", "content"}], "redactions": {...}}},
     "audit": {"segment": <id>, "seq": 17, "prev": <sha256 of the previous line>}}   # added by the chain

Prompt content follows the content policy: nothing by default; ``hash`` adds ``llm.prompt.sha256``;
``redacted`` adds the prompt text after PII redaction. Completion text is never recorded: the proxy relays
responses without keeping them (only usage is read).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import msgspec

from gateway.context import RequestContext
from gateway.prompt import content_text
from gateway.routes import ROUTES_BY_NAME, route_texts

ECS_VERSION = "8.11.0"

_EVENT_TYPE = {
    "allowed": "access",
    "unauthenticated": "denied",
    "forbidden": "denied",
    "rate_limited": "denied",
    "not_found": "denied",
    "invalid_request": "denied",
    "overloaded": "denied",
}


_sec_cache: list[Any] = [None, ""]


def iso_utc(ts: float) -> str:
    """ISO 8601 UTC with milliseconds; the date-time part is cached per second (records come in bursts)."""
    sec = int(ts)
    if _sec_cache[0] != sec:
        _sec_cache[0], _sec_cache[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_sec_cache[1]}.{int(ts * 1000) % 1000:03d}Z"


def prompt_messages(body: dict[str, Any] | None) -> list[dict[str, str]]:
    """The prompt as ``[{role, content}]`` text parts (chat messages, or ``prompt``/``input`` as one user part)."""
    if not isinstance(body, dict):
        return []
    out: list[dict[str, str]] = []
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if not isinstance(m, dict):
                continue
            c = content_text(m.get("content"), "\n")
            if c is not None:
                out.append({"role": str(m.get("role", "")), "content": c})
        return out
    for key in ("prompt", "input"):
        p = body.get(key)
        if isinstance(p, str):
            return [{"role": key, "content": p}]
        if isinstance(p, list):
            return [{"role": key, "content": x} for x in p if isinstance(x, str)]
    return out


def prompt_sha256(messages: list[dict[str, str]]) -> str:
    """sha256 of the prompt text: each part as ``role\\ncontent``, parts separated by a NUL byte."""
    h = hashlib.sha256()
    for i, m in enumerate(messages):
        if i:
            h.update(b"\x00")
        h.update(m["role"].encode())
        h.update(b"\n")
        h.update(m["content"].encode())
    return h.hexdigest()


_IDENT_CACHE: dict[str, str] = {}
_default_redactor: list[Any] = []


def redact_identifier(value: str | None, redactor: Any = None) -> str | None:
    """An identifier (URL path, model name, user id, client request id) with personal data and secrets
    redacted, under every content policy: such values are chosen by callers and can carry a phone number or a
    pasted key. Results are cached (identifiers repeat)."""
    if not value:
        return value
    hit = _IDENT_CACHE.get(value)
    if hit is not None:
        return hit
    if redactor is None:
        if not _default_redactor:
            from gateway.audit.redact import Redactor

            _default_redactor.append(Redactor())
        redactor = _default_redactor[0]
    out = redactor.redact(value)
    if len(_IDENT_CACHE) >= 8192:
        _IDENT_CACHE.clear()
    _IDENT_CACHE[value] = out
    return out


def build_record(ctx: RequestContext, content: str = "none", redactor=None) -> dict[str, Any]:
    duration = ctx.duration
    end_wall = ctx.started_wall + duration
    ok = 200 <= ctx.status < 400 and ctx.decision == "allowed"
    p = ctx.principal
    llm: dict[str, Any] = {
        "model": redact_identifier(ctx.model),
        "upstream": ctx.endpoint,
        "attempts": ctx.attempts,
        "decision": ctx.decision,
        "reason": ctx.reason,
        "stream": ctx.stream,
        "max_tokens": ctx.max_tokens,
        "usage": {
            "prompt_tokens": ctx.prompt_tokens,
            "completion_tokens": ctx.completion_tokens,
            "total_tokens": ctx.total_tokens,
        },
        "ttft_ms": round(ctx.ttft * 1000, 3) if ctx.ttft is not None else None,
        "duration_ms": round(duration * 1000, 3),
        "client_gone": ctx.client_gone,
    }
    user, org, auth = _principal_parts(p)
    if auth is not None:
        llm["auth"] = auth
    if content != "none":
        spec = ROUTES_BY_NAME.get(ctx.route)
        # Each route's own text fields (a rerank's query and documents, a response's instructions and input).
        msgs = (route_texts(spec, ctx.body) if spec is not None else None) or prompt_messages(ctx.body)
        if msgs:
            if content == "hash":
                llm["prompt"] = {"sha256": prompt_sha256(msgs)}
            elif content == "redacted" and redactor is not None:
                total: dict[str, int] = {}
                red = []
                for m in msgs:
                    text, counts = redactor.redact_counted(m["content"])
                    red.append({"role": m["role"], "content": text})
                    for k, v in counts.items():
                        total[k] = total.get(k, 0) + v
                llm["prompt"] = {"messages": red, "redactions": total}
    start = iso_utc(ctx.started_wall)
    rec: dict[str, Any] = {
        "@timestamp": start,
        "ecs": _ECS,
        "event": {
            "kind": "event",
            "category": _CATEGORY,
            "type": _TYPES.get(ctx.decision, _TYPE_ERROR),
            "action": ctx.route,
            "outcome": "success" if ok else "failure",
            "start": start,
            "end": iso_utc(end_wall),
            "duration": int(duration * 1e9),
            "id": ctx.request_id,
        },
        # Namespaced by credential kind and issuer (key:<subject>, jwt:<issuer>#<sub>): never ambiguous.
        "user": user,
        "organization": org,
        "client": {"ip": ctx.client_ip},
        "http": {
            # The client's own X-Request-Id when it sent a valid one (redacted like every identifier), else ours.
            "request": {
                "id": redact_identifier(ctx.client_request_id) or ctx.request_id,
                "method": ctx.method,
                "bytes": ctx.bytes_in,
            },
            "response": {"status_code": ctx.status, "bytes": ctx.bytes_out},
        },
        "url": {"path": redact_identifier(ctx.extra.get("url_path", ctx.route))},
        "llm": llm,
    }
    return rec


# Parts of every record that never change, shared by all records (they are only read, never changed, after
# they are built: the chain adds its "audit" member to the record itself).
_ECS = {"version": ECS_VERSION}
_CATEGORY = ["web"]
_TYPES = {k: [v] for k, v in _EVENT_TYPE.items()}
_TYPE_ERROR = ["error"]
_NO_PRINCIPAL: tuple[dict[str, Any], dict[str, Any], None] = ({"id": None}, {"id": None}, None)
_PARTS: dict[tuple[str, str | None, str, str], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}


def _principal_parts(p: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """The ``user``, ``organization`` and ``llm.auth`` objects of a caller, built once per caller."""
    if p is None:
        return _NO_PRINCIPAL
    key = (p.id, p.key_id, p.tenant, p.kind)
    hit = _PARTS.get(key)
    if hit is None:
        if len(_PARTS) >= 8192:
            _PARTS.clear()
        hit = _PARTS[key] = (_user(p), {"id": p.tenant}, {"kind": p.kind, "key_id": p.key_id})
    return hit


def _user(p: Any) -> dict[str, Any]:
    if p is None:
        return {"id": None}
    uid = p.id
    red = redact_identifier(uid)
    if red == uid:
        return {"id": uid}
    # A subject with personal data in it (a phone number as a token's sub): redacted, and its hash kept so
    # one caller's records can still be told apart and correlated.
    return {"id": red, "hash": hashlib.sha256(uid.encode()).hexdigest()}


_ENCODER = msgspec.json.Encoder(enc_hook=str)


def dumps(rec: dict[str, Any]) -> bytes:
    """One compact JSON line (no newline); UTF-8, non-ASCII kept as is.

    msgspec writes the same bytes as ``json.dumps(ensure_ascii=False, separators=(",", ":"))`` for what a
    record holds (str, int, float, bool, None, lists, str-keyed dicts) in an eighth of the time; anything it
    refuses (a non-string dict key) goes through ``json`` as before."""
    try:
        return _ENCODER.encode(rec)
    except (TypeError, msgspec.EncodeError, OverflowError):
        pass
    except UnicodeEncodeError:
        # A lone surrogate (JSON "\ud800" in a model name) has no UTF-8 form: escaped, the line stays valid.
        return json.dumps(rec, ensure_ascii=True, separators=(",", ":"), default=str).encode()
    try:
        return json.dumps(rec, ensure_ascii=False, separators=(",", ":"), default=str).encode()
    except UnicodeEncodeError:
        return json.dumps(rec, ensure_ascii=True, separators=(",", ":"), default=str).encode()
