"""The request path's pure parts: the outcome classifier, the admission chain, request parsing, SSE framing."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.admission import AdmissionChain, ModelAccess, build_admission_chain
from gateway.audit.config import AuditSettings
from gateway.audit.writer import AuditWriter
from gateway.auth import Authenticator
from gateway.auth.apikeys import ApiKeyStore
from gateway.auth.principal import Principal
from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.hooks import NO_TICKET, Ticket
from gateway.outcome import CLIENT_GONE, Outcome, StreamEnd, UpstreamStatus, classify
from gateway.proxy.request import RouteSpec, parse_request, read_json
from gateway.proxy.routes import PROXIED_ROUTES
from gateway.proxy.sse import split_complete
from gateway.quota.config import QuotaSettings
from gateway.quota.metrics import QuotaMetrics
from gateway.settings import GatewaySettings

CHAT = RouteSpec("/v1/chat/completions", "/v1/chat/completions")
EMBED = RouteSpec("/v1/embeddings", "/v1/embeddings", streamable=False)


@pytest.mark.parametrize(
    "ending, outcome, reason",
    [
        (None, Outcome.ALLOWED, None),
        (ApiError(401, "x", code="invalid_api_key"), Outcome.UNAUTHENTICATED, "invalid_api_key"),
        (ApiError(503, "x", reason="auth_unavailable"), Outcome.UNAUTHENTICATED, "auth_unavailable"),
        (ApiError(403, "x", code="model_not_allowed"), Outcome.FORBIDDEN, "model_not_allowed"),
        (ApiError(404, "x", reason="not_found"), Outcome.NOT_FOUND, "not_found"),
        (ApiError(429, "x", reason="rate_limited"), Outcome.RATE_LIMITED, "rate_limited"),
        (ApiError(400, "x", code="invalid_json"), Outcome.INVALID_REQUEST, "invalid_json"),
        (ApiError(413, "x", code="request_too_large"), Outcome.INVALID_REQUEST, "request_too_large"),
        (ApiError(503, "x", code="draining"), Outcome.OVERLOADED, "draining"),
        (ApiError(503, "x", reason="upstream_error"), Outcome.UPSTREAM_ERROR, "upstream_error"),
        (ApiError(502, "x", reason="upstream_error"), Outcome.UPSTREAM_ERROR, "upstream_error"),
        (ApiError(504, "x", reason="upstream_error"), Outcome.UPSTREAM_ERROR, "upstream_error"),
        (ApiError(500, "x", code="internal_error"), Outcome.UPSTREAM_ERROR, "internal_error"),
        (UpstreamStatus(500), Outcome.UPSTREAM_ERROR, "upstream_500"),
        (UpstreamStatus(400), Outcome.INVALID_REQUEST, "upstream_400"),
        (StreamEnd.DRAIN_DEADLINE, Outcome.OVERLOADED, "drain_deadline"),
        (StreamEnd.IDLE_TIMEOUT, Outcome.UPSTREAM_ERROR, "stream_idle_timeout"),
        (StreamEnd.TOTAL_TIMEOUT, Outcome.UPSTREAM_ERROR, "stream_total_timeout"),
        (StreamEnd.BROKEN, Outcome.UPSTREAM_ERROR, "stream_broken"),
        (StreamEnd.TRUNCATED, Outcome.UPSTREAM_ERROR, "stream_truncated"),
        (CLIENT_GONE, Outcome.CLIENT_CLOSED, None),
    ],
)
def test_one_classifier_for_every_ending(ending, outcome, reason):
    assert classify(ending) == (outcome, reason)


def test_the_first_ending_recorded_wins():
    ctx = RequestContext("r", "/v1/completions")
    ctx.end(StreamEnd.DRAIN_DEADLINE)
    ctx.end(CLIENT_GONE)
    ctx.classify()
    assert (ctx.decision, ctx.reason) == ("overloaded", "drain_deadline")


class Step:
    """A step that records its turn, and holds a ticket or refuses when told to."""

    def __init__(
        self, name: str, log: list[str], refuse: bool = False, hold: bool = False, wait: bool = False
    ):
        self.name, self.log, self.refuse, self.hold, self.wait = name, log, refuse, hold, wait

    async def admit(self, ctx: RequestContext) -> Ticket | None:
        self.log.append(f"admit {self.name}")
        if self.wait:
            await asyncio.sleep(3600)
        if self.refuse:
            raise ApiError(429, f"{self.name} says no")
        if not self.hold:
            return None
        log, name = self.log, self.name

        class _Held:
            async def settle(self, ctx: RequestContext) -> None:
                log.append(f"settle {name}")

        return _Held()


async def test_chain_runs_steps_in_order_and_settles_what_it_holds_in_reverse():
    log: list[str] = []
    chain = AdmissionChain([Step("a", log, hold=True), Step("b", log), Step("c", log, hold=True)])
    ticket = await chain.admit(RequestContext("r", "/v1/completions"))
    assert log == ["admit a", "admit b", "admit c"]
    await ticket.settle(RequestContext("r", "/v1/completions"))
    assert log[3:] == ["settle c", "settle a"]
    assert await AdmissionChain([Step("x", [])]).admit(RequestContext("r", "/")) is NO_TICKET


async def test_a_refusal_gives_back_what_earlier_steps_hold_and_stops_the_chain():
    log: list[str] = []
    chain = AdmissionChain([Step("a", log, hold=True), Step("b", log, refuse=True), Step("c", log)])
    with pytest.raises(ApiError, match="b says no"):
        await chain.admit(RequestContext("r", "/v1/completions"))
    assert log == ["admit a", "admit b", "settle a"]


async def test_a_client_leaving_during_a_wait_gives_back_what_earlier_steps_hold():
    log: list[str] = []
    chain = AdmissionChain([Step("a", log, hold=True), Step("w", log, wait=True)])
    task = asyncio.ensure_future(chain.admit(RequestContext("r", "/v1/completions")))
    while log != ["admit a", "admit w"]:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log[-1] == "settle a"


def test_the_chain_is_ordered_cheapest_refusal_first_and_waits_last(tmp_path):
    quota = QuotaSettings.model_validate({"default": {"rpm": 10}, "overload": {"enabled": True}})
    audit = AuditWriter(AuditSettings(enabled=True, sink="stdout"))
    auth = Authenticator(ApiKeyStore([], None))
    chain, quota_step = build_admission_chain(quota, auth, {}, QuotaMetrics(), audit)
    assert chain.names == ["model_access", "quota", "audit_backpressure", "overload"]
    assert quota_step is not None
    off, none = build_admission_chain(QuotaSettings(), auth, {})
    assert off.names == ["model_access"] and none is None


async def test_model_access_refuses_a_model_the_principal_may_not_use():
    step = ModelAccess(Authenticator(ApiKeyStore([], None)))
    ctx = RequestContext("r", "/v1/completions")
    ctx.principal, ctx.model = Principal("alice", models=frozenset({"m1"})), "m2"
    with pytest.raises(ApiError) as e:
        await step.admit(ctx)
    assert e.value.status == 403
    ctx.model = "m1"
    assert await step.admit(ctx) is None


def settings(**model: object) -> GatewaySettings:
    return GatewaySettings(models=[{"name": "m", "upstreams": ["http://a:1"], **model}])


def test_parse_forwards_the_clients_bytes_when_nothing_changes():
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "new_param": 1}'
    hdrs = [(b"traceparent", b"00-abc-def-01"), (b"x-session-id", b"s1")]
    body, raw2 = read_json(CHAT, raw, settings())
    req = parse_request(CHAT, body, raw2, hdrs, "req-1", settings())
    assert req.upstream_body is raw
    assert (req.model.name, req.stream, req.max_tokens, req.prompt_chars, req.session_id) == (
        "m",
        False,
        5,
        2,
        "s1",
    )
    assert req.upstream_headers["traceparent"] == "00-abc-def-01"
    assert req.upstream_headers["x-request-id"] == "req-1"


def test_parse_asks_a_stream_for_usage_and_renames_the_model_for_the_engine():
    s = settings(upstream_model="engine-name", upstream_api_key="k")
    raw = b'{"model": "m", "prompt": "hi", "stream": true}'
    req = parse_request(CHAT, json.loads(raw), raw, [], "r", s)
    sent = json.loads(req.upstream_body)
    assert sent["model"] == "engine-name" and sent["stream_options"] == {"include_usage": True}
    assert not req.client_wants_usage and req.upstream_headers["authorization"] == "Bearer k"
    own = b'{"model": "m", "prompt": "hi", "stream": true, "stream_options": {"include_usage": true}}'
    req = parse_request(CHAT, json.loads(own), own, [], "r", settings())
    assert req.client_wants_usage and req.upstream_body is own


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "prompt": "hi", "stream": true}',
        b'{"model":"m","prompt":"caf\xc3\xa9 \\u00e9","stream":true,"n":1}  \n',
        b'{"model": "m", "prompt": "hi", "stream": true, "stream_options": {}}',
        b'{"model": "m", "prompt": "hi", "stream": true, "stream_options": {"include_usage": false}}',
    ],
)
def test_a_stream_without_usage_asks_the_engine_for_it_and_keeps_every_other_member(raw):
    body, raw2 = read_json(CHAT, raw, settings())
    req = parse_request(CHAT, body, raw2, [], "r", settings())
    sent = json.loads(req.upstream_body)
    assert sent.pop("stream_options") == {"include_usage": True}
    body.pop("stream_options", None)
    assert sent == body and not req.client_wants_usage


@pytest.mark.parametrize(
    "route, body, status, param",
    [
        (CHAT, {"prompt": "x"}, 400, "model"),
        (CHAT, {"model": "nope"}, 404, "model"),
        (CHAT, {"model": "m", "stream": "yes"}, 400, "stream"),
        (EMBED, {"model": "m", "stream": True}, 400, "stream"),
        (CHAT, {"model": "m", "max_tokens": -1}, 400, "max_tokens"),
        (CHAT, {"model": "m", "max_tokens": True}, 400, "max_tokens"),
        (CHAT, {"model": "m", "stream": True, "stream_options": 3}, 400, "stream_options"),
    ],
)
def test_parse_refuses_bad_fields_naming_them(route, body, status, param):
    with pytest.raises(ApiError) as e:
        parse_request(route, body, json.dumps(body).encode(), [], "r", settings())
    assert (e.value.status, e.value.param) == (status, param)


def test_generate_route_is_a_completions_request():
    spec = dict(PROXIED_ROUTES)["/generate"]
    body, raw = read_json(spec, b'{"prompt": "hello", "max_tokens": 3}', settings())
    assert raw == b"" and body == {"model": "m", "prompt": "hello", "max_tokens": 3, "stream": False}
    req = parse_request(spec, body, raw, [], "r", settings())
    assert json.loads(req.upstream_body) == body and spec.upstream_path == "/v1/completions"


def test_sse_framing_keeps_a_partial_event_for_the_next_read():
    assert split_complete(b"data: 1\n\ndata: 2\n\ndata: 3") == (b"data: 1\n\ndata: 2\n\n", b"data: 3")
    assert split_complete(b"data: 1") == (b"", b"data: 1")
    assert split_complete(b"data: 1\n\n") == (b"data: 1\n\n", b"")
