"""Quotas end to end: gateway processes (``python -m gateway serve``) in front of the real vLLM engine, with a
real redis-server holding the counters. A simulated upstream is used only to inject an engine queue."""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import uuid

import httpx
import pytest

from gateway.quota.limits import PERIOD, parse_reset
from tests.conftest import KEY_ALL, MODEL, gateway_config
from tests.support import scrape_sum, wait_for

AUTH = {"authorization": f"Bearer {KEY_ALL}"}
CHAT = "/v1/chat/completions"


def quota_cfg(redis_url: str | None, limits: dict, **extra) -> dict:
    q = {"key_prefix": f"e2e:{uuid.uuid4().hex}:", "principals": {"all": limits}, "default_max_tokens": 16}
    q["redis_timeout"] = 5.0  # exact counting is under test here, not a slow Redis on a loaded box
    if redis_url:
        q.update(backend="redis", redis_url=redis_url)
    q.update(extra)
    return q


def chat_body(max_tokens: int = 1, content: str = "Hello there", **extra) -> dict:
    return {
        "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "ignore_eos": True, "temperature": 0, **extra,
    }


def reservation(content: str, max_tokens: int) -> int:
    """What the gateway reserves for one single-message chat request (defaults: 4 chars/token, 4/message)."""
    return math.ceil(len(content) / 4) + 4 + max_tokens


async def post_many(url: str, n: int, body: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as c:
        return await asyncio.gather(*(c.post(url + CHAT, json=body, headers=AUTH) for _ in range(n)))


def metric(gw, name: str, labels: dict[str, str]) -> float:
    """A sample family's sum from the gateway's metrics port."""
    return scrape_sum(gw.metrics_url, name, labels)


def ended(gw, n: int) -> None:
    """Wait until the gateway finished ``n`` requests (settled, then counted by the metrics observer)."""
    wait_for(lambda: metric(gw, "llm_gateway_requests_total", {}) >= n, what=f"{n} finished requests")




def assert_openai_429(r: httpx.Response) -> None:
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded" and err["message"]
    assert int(r.headers["retry-after"]) >= 1
    for h in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{h}-requests" in r.headers or f"x-ratelimit-{h}-tokens" in r.headers


@pytest.mark.engine
def test_rpm_exact_under_concurrency(engine, redis_server, gateway_factory):
    gw = gateway_factory(gateway_config([engine.url], quota=quota_cfg(redis_server.url, {"rpm": 10})))
    rs = asyncio.run(post_many(gw.url, 30, chat_body()))
    ok = [r for r in rs if r.status_code == 200]
    refused = [r for r in rs if r.status_code == 429]
    assert len(ok) == 10 and len(refused) == 20
    for r in refused:
        assert_openai_429(r)
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    for r in ok:
        assert r.json()["usage"]["completion_tokens"] == 1
        assert r.headers["x-ratelimit-limit-requests"] == "10"
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(10))
    assert metric(gw, "llm_gateway_quota_rejected_total", {"reason": "requests"}) == 20


@pytest.mark.engine
def test_two_gateways_share_one_redis_limit(engine, redis_server, gateway_factory):
    q = quota_cfg(redis_server.url, {"rpm": 10})
    a = gateway_factory(gateway_config([engine.url], quota=q))
    b = gateway_factory(gateway_config([engine.url], quota=q))

    async def both():
        return await asyncio.gather(post_many(a.url, 12, chat_body()), post_many(b.url, 12, chat_body()))

    ra, rb = asyncio.run(both())
    codes = [r.status_code for r in ra + rb]
    # Per-replica counters would admit 10 on each (20); one shared limit admits 10 in all.
    assert codes.count(200) == 10 and codes.count(429) == 14
    # A further request on either replica is refused.
    assert httpx.post(a.url + CHAT, json=chat_body(), headers=AUTH, timeout=60).status_code == 429
    assert httpx.post(b.url + CHAT, json=chat_body(), headers=AUTH, timeout=60).status_code == 429


def _stream(url: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    with httpx.stream("POST", url + CHAT, json=body, headers=AUTH, timeout=120) as r:
        return r.status_code, dict(r.headers), r.read()


def _events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


@pytest.mark.engine
def test_stream_reserved_at_admission_and_settled_to_real_usage(engine, redis_server, gateway_factory):
    q = quota_cfg(redis_server.url, {"tpm": 120})  # 0.5 s of TAT per token, 120 tokens of burst
    gw = gateway_factory(gateway_config([engine.url], quota=q))
    r = redis_server.client()
    key = q["key_prefix"] + "p:key:all:t"
    us_per_token = PERIOD / 120 * 1e6
    try:
        # Prime: the bucket's TAT moves ahead of the clock (and stays ahead for the rest of the test).
        prime = httpx.post(gw.url + CHAT, json=chat_body(10), headers=AUTH, timeout=120)
        assert prime.status_code == 200
        prime_usage = prime.json()["usage"]
        ended(gw, 1)
        tat0 = int(r.get(key))
        # The stream: reserves prompt estimate + max_tokens at admission...
        body = chat_body(40, stream=True, stream_options={"include_usage": True})
        status, headers, raw = _stream(gw.url, body)
        assert status == 200
        assert int(headers["x-ratelimit-remaining-tokens"]) <= 120 - prime_usage["total_tokens"] - reservation("Hello there", 40) + 10
        usage = json.loads(_events(raw)[-2][6:])["usage"]
        assert usage["completion_tokens"] == 40
        # ...and settlement moves the counter to the real usage exactly.
        ended(gw, 2)
        assert int(r.get(key)) - tat0 == pytest.approx(usage["total_tokens"] * us_per_token, abs=2)
        # A stream whose reservation exceeds what is left is refused up front; nothing is charged.
        before = int(r.get(key))
        status, headers, raw = _stream(gw.url, chat_body(100, stream=True))
        assert status == 429 and b"tokens per min" in raw and int(headers["retry-after"]) >= 1
        assert int(headers["x-ratelimit-remaining-tokens"]) < reservation("Hello there", 100)
        assert int(r.get(key)) == before
        # One larger than the whole TPM limit can never run.
        status, _, raw = _stream(gw.url, chat_body(500, stream=True))
        assert status == 429 and b"Request too large" in raw
        # A stream that fits is admitted.
        status, _, raw = _stream(gw.url, chat_body(4, stream=True))
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    finally:
        r.close()


@pytest.mark.engine
def test_usage_chunk_hidden_or_kept_as_the_client_asked(engine, redis_server, gateway_factory):
    q = quota_cfg(redis_server.url, {"tpm": 60})  # 1 s of TAT per token: the TAT stays ahead of the clock
    gw = gateway_factory(gateway_config([engine.url], quota=q))
    r = redis_server.client()
    key = q["key_prefix"] + "p:key:all:t"
    try:
        # Asked: exactly one usage chunk, the last before [DONE], with the real counts.
        status, _, asked = _stream(gw.url, chat_body(8, stream=True, stream_options={"include_usage": True}))
        assert status == 200
        ev = _events(asked)
        usage_events = [e for e in ev if b'"usage":{' in e]
        assert len(usage_events) == 1 and usage_events[0] == ev[-2] and ev[-1] == b"data: [DONE]"
        last = json.loads(usage_events[0][6:])
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
        assert all(json.loads(e[6:])["choices"] for e in ev[:-2])
        ended(gw, 1)
        tat_after_first = int(r.get(key))
        # Did not ask: the gateway still forces include_usage upstream (settlement needs it); the client
        # sees no usage chunk and no usage field at all.
        status, _, plain = _stream(gw.url, chat_body(8, stream=True))
        assert status == 200
        ev = _events(plain)
        assert ev[-1] == b"data: [DONE]"
        assert all(e.startswith(b"data: {") and json.loads(e[6:])["choices"] for e in ev[:-1])
        assert b'"usage"' not in plain
        # ...and the hidden usage settled the quota: the same request (same prompt, 8 tokens with
        # ignore_eos) moved the TAT by exactly its real total, not by its reservation.
        ended(gw, 2)
        total = last["usage"]["total_tokens"]
        assert total != reservation("Hello there", 8)
        assert int(r.get(key)) - tat_after_first == pytest.approx(total * PERIOD / 60 * 1e6, abs=2)
        assert metric(gw, "llm_gateway_completion_tokens_total", {"model": MODEL}) == 16
    finally:
        r.close()


@pytest.mark.engine
def test_rate_limit_headers_present_and_correct(engine, gateway_factory):
    gw = gateway_factory(gateway_config([engine.url], quota=quota_cfg(None, {"rpm": 3, "tpm": 1000})))
    res = [httpx.post(gw.url + CHAT, json=chat_body(2), headers=AUTH, timeout=60) for _ in range(4)]
    assert [x.status_code for x in res] == [200, 200, 200, 429]
    first = res[0].headers
    assert first["x-ratelimit-limit-requests"] == "3" and first["x-ratelimit-remaining-requests"] == "2"
    assert 19 < parse_reset(first["x-ratelimit-reset-requests"]) <= 20
    assert first["x-ratelimit-limit-tokens"] == "1000"
    assert first["x-ratelimit-remaining-tokens"] == str(1000 - reservation("Hello there", 2))
    assert 0 < parse_reset(first["x-ratelimit-reset-tokens"]) <= 60
    assert re.fullmatch(r"(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)", first["x-ratelimit-reset-tokens"])
    assert [x.headers["x-ratelimit-remaining-requests"] for x in res] == ["2", "1", "0", "0"]
    denied = res[3]
    assert_openai_429(denied)
    assert 1 <= int(denied.headers["retry-after"]) <= 20
    assert 0 < int(denied.headers["retry-after-ms"]) <= 20_000
    assert denied.headers["x-request-id"]
    # Streams carry them too (headers go out before the first chunk).
    gw2 = gateway_factory(gateway_config([engine.url], quota=quota_cfg(None, {"rpm": 5})))
    status, headers, _ = _stream(gw2.url, chat_body(2, stream=True))
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "4"
    assert "x-ratelimit-limit-tokens" not in headers  # no token limit configured, no token headers


@pytest.mark.engine
def test_redis_stopped_mid_run(engine, own_redis, gateway_factory):
    common = {"redis_retry_interval": 0.2}
    opened = gateway_factory(gateway_config([engine.url], quota=quota_cfg(own_redis.url, {"rpm": 2}, on_backend_error="open", **common)))
    closed = gateway_factory(gateway_config([engine.url], quota=quota_cfg(own_redis.url, {"rpm": 100}, on_backend_error="closed", **common)))
    post = lambda gw: httpx.post(gw.url + CHAT, json=chat_body(), headers=AUTH, timeout=60)  # noqa: E731
    assert post(opened).status_code == 200 and post(closed).status_code == 200
    own_redis.stop()
    # Fail open: local limits of 2/min that start from the last shared state (1 used), not a fresh bucket.
    assert [post(opened).status_code for _ in range(3)] == [200, 429, 429]
    assert metric(opened, "llm_gateway_quota_backend_errors_total", {"mode": "open"}) == 3
    assert metric(opened, "llm_gateway_quota_backend_up", {"backend": "redis"}) == 0
    assert "fail open" in opened.proc.log()
    # Fail closed: 503 with Retry-After, in OpenAI's shape.
    r = post(closed)
    assert r.status_code == 503 and r.json()["error"]["code"] == "quota_backend_unavailable"
    assert int(r.headers["retry-after"]) >= 1
    assert metric(closed, "llm_gateway_quota_backend_errors_total", {"mode": "closed"}) >= 1
    assert "fail closed" in closed.proc.log()
    # Redis back: the closed gateway serves again, on shared limits.
    own_redis.start()
    wait_for(lambda: post(closed).status_code == 200, what="recovery after redis restart")
    assert metric(closed, "llm_gateway_quota_backend_up", {"backend": "redis"}) == 1


def test_overload_bounded_queue_then_503(queueing_upstream, gateway_factory):
    queueing_upstream.set_waiting(100)
    overload = {"enabled": True, "queue_threshold": 5, "max_queued": 2, "max_wait": 5, "retry_after": 3}
    cfg = gateway_config([queueing_upstream.url], quota={"overload": overload}, health_interval=0.1)
    gw = gateway_factory(cfg)
    rs = asyncio.run(post_many(gw.url, 6, chat_body()))
    assert [r.status_code for r in rs] == [503] * 6
    for r in rs:
        assert r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "engine_overloaded"
    # Two waited (bounded queue) and timed out; four found the queue full.
    assert metric(gw, "llm_gateway_quota_rejected_total", {"reason": "queue_full"}) == 4
    assert metric(gw, "llm_gateway_quota_rejected_total", {"reason": "overloaded"}) == 2
    assert metric(gw, "llm_gateway_requests_total", {"decision": "overloaded"}) == 6
    # A waiting request goes through once the engine's queue drains.
    out: list[httpx.Response] = []
    t = threading.Thread(target=lambda: out.append(httpx.post(gw.url + CHAT, json=chat_body(), headers=AUTH, timeout=60)))
    t.start()
    wait_for(lambda: metric(gw, "llm_gateway_admission_queue_depth", {"model": MODEL}) == 1, what="queued")
    queueing_upstream.set_waiting(0)
    t.join(30)
    assert out and out[0].status_code == 200
    assert metric(gw, "llm_gateway_admission_queued_total", {"outcome": "admitted"}) == 1
    assert metric(gw, "llm_gateway_requests_total", {"status_class": "2xx"}) == 1
