"""Faults a real vLLM cannot be made to produce on demand, injected by a simulated upstream next to the
session's real engine: a replica that hangs, answers 500, is slow to its first byte, drops or stalls a
stream. Plus: client 4xx storms against the real engine never open a breaker; DNS-named upstreams."""

from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Any

import httpx
import pytest

from gateway.routing.affinity import HashRing, affinity_key
from gateway.settings import RoutingSettings
from tests.conftest import KEY_ALL, MODEL, gateway_config
from tests.fixtures_routing import gateway_metric, sse_events

pytestmark = pytest.mark.engine

AUTH = {"Authorization": f"Bearer {KEY_ALL}"}


def config(upstreams: list[str], timeouts: dict[str, float] | None = None, **routing: Any) -> dict[str, Any]:
    routing = {"policy": "least_outstanding", "retry_min": 100, **routing}
    cfg = gateway_config(upstreams, routing=routing, health_interval=0.5, max_retries=2)
    if timeouts:
        cfg["models"][0]["timeouts"] = timeouts
    return cfg


def session_homed_on(url: str, urls: list[str]) -> str:
    """A session id whose place on the gateway's consistent-hash ring is ``url`` (pure functions, no I/O)."""
    ring = HashRing(urls, RoutingSettings().virtual_nodes)
    for i in range(10000):
        sid = f"session-{i}"
        if next(ring.walk(affinity_key(None, 1024, session=sid))) == url:
            return sid
    raise AssertionError("no session id found")


def complete(
    gw, max_tokens: int = 4, stream: bool = False, prompt: str = "Hello there", session: str | None = None
) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    headers = dict(AUTH, **({"x-session-id": session} if session else {}))
    return httpx.post(gw.url + "/v1/completions", json=body, headers=headers, timeout=120)


def stream_lines(
    gw, max_tokens: int = 8, chat: bool = False, session: str | None = None
) -> tuple[int, list[str]]:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    if chat:
        body["messages"] = [{"role": "user", "content": "Hello"}]
    else:
        body["prompt"] = "Hello there"
    headers = dict(AUTH, **({"x-session-id": session} if session else {}))
    with httpx.stream("POST", gw.url + path, json=body, headers=headers, timeout=120) as r:
        return r.status_code, list(r.iter_lines())


def concurrently(fn, n: int) -> list:
    with cf.ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda _: fn(), range(n)))


@pytest.mark.parametrize("mode", ["hang", "error500"])
def test_faulty_replica_is_ejected_and_the_other_keeps_serving(
    engine, fake_upstream_factory, routing_gateway, mode
):
    fake = fake_upstream_factory(mode)
    gw = routing_gateway(
        config([fake.url, engine.url], {"first_byte": 1.5}, breaker_failures=2, breaker_open=120)
    )
    # A sticky session whose home is the faulty replica: each request fails there before its first byte
    # and is retried on the engine, until two faults open the faulty replica's breaker.
    sid = session_homed_on(fake.url, [fake.url, engine.url])
    results = [complete(gw, session=sid) for _ in range(10)]
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4 for r in results)
    assert fake.completions == 2  # ejected: no more traffic
    assert gateway_metric(gw, "llm_gateway_breaker_state", endpoint=fake.url, state="open") == 1
    assert gateway_metric(gw, "llm_gateway_retries_total") == 2
    assert gateway_metric(gw, "llm_gateway_replica_faults_total", endpoint=engine.url) == 0


def test_slow_first_byte_is_retried_before_anything_reached_the_client(
    engine, fake_upstream_factory, routing_gateway
):
    fake = fake_upstream_factory("slow_first_byte", delay=30)
    gw = routing_gateway(config([fake.url, engine.url], {"first_byte": 1.5}))
    sid = session_homed_on(fake.url, [fake.url, engine.url])
    results = [stream_lines(gw, 6, chat=True, session=sid)]
    assert fake.completions == 1
    for status, lines in results:
        events, done = sse_events(lines)
        assert status == 200 and done
        assert not any("error" in e for e in events)
        assert (
            sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content") is not None)
            >= 1
        )


def test_replica_dropping_mid_stream_gives_an_error_event_and_a_clean_end(
    fake_upstream_factory, routing_gateway
):
    fake = fake_upstream_factory("drop_mid_stream")
    other = fake_upstream_factory("ok")
    gw = routing_gateway(config([fake.url], {"first_byte": 5}))
    status, lines = stream_lines(gw, 8)
    events, done = sse_events(lines)
    assert status == 200 and done
    assert [e["choices"][0]["text"] for e in events[:2]] == [" t0", " t1"]
    assert (
        events[-1]["error"]["type"] == "upstream_error"
        and events[-1]["error"]["code"] == "upstream_disconnected"
    )
    assert fake.completions == 1  # never retried once streaming began
    assert other.completions == 0


def test_stalled_stream_ends_at_the_idle_timeout_with_an_error_event(fake_upstream_factory, routing_gateway):
    fake = fake_upstream_factory("stall_mid_stream")
    gw = routing_gateway(config([fake.url], {"first_byte": 5, "idle": 1.0}))
    status, lines = stream_lines(gw, 8, chat=True)
    events, done = sse_events(lines)
    assert status == 200 and done
    assert len([e for e in events if "choices" in e]) == 2
    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert gateway_metric(gw, "llm_gateway_replica_faults_total", endpoint=fake.url) == 1


def test_default_timeouts_end_a_stalled_stream_with_an_error_event(fake_upstream_factory, routing_gateway):
    # No timeouts configured: the defaults (idle 30 s between chunks) must end a stream whose replica went
    # silent (a SIGSTOPped or wedged engine). Under the old default (300 s) the client's 90 s read timeout
    # below fires first and the test fails: that is the hang guard, not a timing assertion.
    fake = fake_upstream_factory("stall_mid_stream")
    cfg = config([fake.url])
    assert "timeouts" not in cfg["models"][0]
    gw = routing_gateway(cfg)
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 8, "stream": True}
    with httpx.stream(
        "POST", gw.url + "/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(10, read=90)
    ) as r:
        status, lines = r.status_code, list(r.iter_lines())
    events, done = sse_events(lines)
    assert status == 200 and done
    assert len([e for e in events if "choices" in e]) == 2
    assert events[-1]["error"]["code"] == "upstream_timeout"


def test_client_4xx_storm_never_opens_a_breaker(engine, fake_upstream_factory, routing_gateway):
    fake = fake_upstream_factory("error400")
    gw = routing_gateway(
        config([engine.url, fake.url], breaker_failures=2, outlier_min_requests=2, outlier_window=4)
    )
    # The real engine rejects a max_tokens beyond its context (400); the fake rejects everything (400).
    statuses = concurrently(lambda: complete(gw, max_tokens=100000).status_code, 30)
    assert statuses == [400] * 30
    assert fake.completions > 2
    assert gateway_metric(gw, "llm_gateway_breaker_opened_total") == 0
    assert gateway_metric(gw, "llm_gateway_outlier_ejections_total") == 0
    assert gateway_metric(gw, "llm_gateway_replica_available") == 2
    assert gateway_metric(gw, "llm_gateway_retries_total") == 0
    r = httpx.post(
        gw.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 100000},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_dns_named_upstream_resolves_to_the_engine(engine, routing_gateway):
    gw = routing_gateway(config([f"dns+http://localhost:{engine.port}"], dns_interval=1))
    assert gateway_metric(gw, "llm_gateway_replicas") >= 1
    assert gateway_metric(gw, "llm_gateway_replica_healthy", endpoint=f"http://127.0.0.1:{engine.port}") == 1
    r = complete(gw)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(gw.url + "/readyz", timeout=5).status_code == 200


def test_open_breaker_half_opens_and_closes_when_the_replica_recovers(
    engine, fake_upstream_factory, routing_gateway
):
    fake = fake_upstream_factory("error500")
    gw = routing_gateway(config([fake.url, engine.url], breaker_failures=2, breaker_open=1.0))
    sid = session_homed_on(fake.url, [fake.url, engine.url])
    assert [complete(gw, session=sid).status_code for _ in range(2)] == [200, 200]  # retried on the engine
    assert gateway_metric(gw, "llm_gateway_breaker_opened_total") == 1
    fake.set_mode("ok")  # the replica recovers (resets its request count)
    # Once the open period is over, the next request is the half-open trial; it succeeds and closes it.
    deadline = time.monotonic() + 30
    while fake.completions == 0 and time.monotonic() < deadline:
        assert complete(gw, session=sid).status_code == 200
    assert fake.completions == 1
    assert gateway_metric(gw, "llm_gateway_breaker_state", endpoint=fake.url, state="closed") == 1
    for _ in range(3):
        assert complete(gw, session=sid).status_code == 200
    assert fake.completions == 4  # back home
