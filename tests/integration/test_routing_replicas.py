"""Routing across TWO real vLLM CPU replicas of the tiny model: load spreads by outstanding requests,
a shared prompt prefix lands on one replica (visible in vLLM's prefix-cache counters) while bounded load
still spills a hot prefix over, and killing a replica under load loses no request that had not started
streaming. The second engine is started for this module and killed by its last test."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import KEY_ALL, MODEL, gateway_config
from tests.fixtures_routing import gateway_metric, kill_engine_hard, sse_events
from tests.support import Engine

pytestmark = pytest.mark.engine

AUTH = {"Authorization": f"Bearer {KEY_ALL}"}
SYSTEM = (
    "You are the support assistant of a small bicycle repair shop in a harbour town. Answer briefly and "
    "politely, quote prices in euros, never promise a repair date before a mechanic has seen the bicycle, "
    "suggest the spring service for chains, brakes and gears, and mention that tyres are fitted while you wait. "
) * 4


@pytest.fixture(scope="module")
def engine_b(tiny_model_dir) -> Iterator[Engine]:
    e = Engine(str(tiny_model_dir), served_name=MODEL)
    try:
        yield e.wait_ready()
    finally:
        e.stop()


def config(upstreams: list[str], **routing: Any) -> dict[str, Any]:
    return gateway_config(
        upstreams, routing={"retry_min": 100, **routing}, health_interval=0.3, max_retries=2
    )


def successes(*engines: Engine) -> list[float]:
    return [e.metric("vllm:request_success_total") for e in engines]


def chat(gw, user: str, max_tokens: int = 4, stream: bool = False, system: str = SYSTEM) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=300) as r:
            r.read()
            return r
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=300)


def wait_until(cond, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_load_spreads_by_outstanding_requests(engine, engine_b, routing_gateway):
    gw = routing_gateway(config([engine.url, engine_b.url], policy="least_outstanding"))
    before = successes(engine, engine_b)
    with cf.ThreadPoolExecutor(8) as ex:
        rs = list(
            ex.map(
                lambda i: chat(gw, f"question {i}", max_tokens=64, stream=True, system="Be brief."), range(8)
            )
        )
    assert all(r.status_code == 200 for r in rs)
    got = [a - b for a, b in zip(successes(engine, engine_b), before, strict=False)]
    assert sum(got) == 8 and min(got) >= 3

    # The engine's own report counts too: keep replica B busy from outside this gateway (another gateway,
    # say); once the scrape shows it, new requests go to A.
    stop = threading.Event()

    def busy() -> None:
        body = {
            "model": MODEL,
            "prompt": "Long story:",
            "max_tokens": 900,
            "ignore_eos": True,
            "stream": True,
        }
        while not stop.is_set():  # one long request after another, until told to stop
            with httpx.stream("POST", engine_b.url + "/v1/completions", json=body, timeout=300) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        return

    threads = [threading.Thread(target=busy) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: gateway_metric(gw, "llm_gateway_replica_engine_running", endpoint=engine_b.url) >= 3
        )
        a0 = engine.metric("vllm:request_success_total")
        for i in range(3):
            assert chat(gw, f"next {i}", system="Be brief.").status_code == 200
        assert engine.metric("vllm:request_success_total") - a0 == 3
    finally:
        stop.set()
        for t in threads:
            t.join(120)


def test_prefix_affinity_keeps_a_shared_prefix_on_one_replica_and_spills_when_hot(
    engine, engine_b, routing_gateway
):
    gw = routing_gateway(config([engine.url, engine_b.url], policy="prefix_affinity", prefix_chars=512))
    engines = (engine, engine_b)
    s0 = successes(*engines)
    h0 = [e.metric("vllm:prefix_cache_hits_total") for e in engines]
    for i in range(6):
        r = chat(gw, f"Do you fix flat tyres on a Sunday? ({i})")
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 128
    s1 = successes(*engines)
    hits = [e.metric("vllm:prefix_cache_hits_total") - h for e, h in zip(engines, h0, strict=False)]
    served = [a - b for a, b in zip(s1, s0, strict=False)]
    assert sorted(served) == [0, 6]
    home = served.index(6)
    assert hits[home] > 0 and hits[1 - home] == 0

    # Eight at once with the same prefix: bounded load lets the home replica take only its share.
    with cf.ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(lambda i: chat(gw, f"And brakes? ({i})", max_tokens=64, stream=True), range(8)))
    assert all(r.status_code == 200 for r in rs)
    spread = [a - b for a, b in zip(successes(*engines), s1, strict=False)]
    assert sum(spread) == 8 and 0 < spread[1 - home] < spread[home]


def test_killing_a_replica_under_load_loses_no_request_that_had_not_started_streaming(
    engine, engine_b, routing_gateway
):
    gw = routing_gateway(config([engine.url, engine_b.url], policy="least_outstanding"))
    max_tokens = 400

    def plain(i: int) -> httpx.Response:
        body = {"model": MODEL, "prompt": f"Tell me about {i}", "max_tokens": max_tokens, "ignore_eos": True}
        return httpx.post(gw.url + "/v1/completions", json=body, headers=AUTH, timeout=300)

    def streamed(i: int) -> tuple[int, list[str]]:
        body = {
            "model": MODEL,
            "prompt": f"Stream {i}",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=AUTH, timeout=300) as r:
            return r.status_code, list(r.iter_lines())

    with cf.ThreadPoolExecutor(12) as ex:
        plain_f = [ex.submit(plain, i) for i in range(9)]
        stream_f = [ex.submit(streamed, i) for i in range(3)]
        # Kill B while the gateway has several requests in flight there.
        wait_until(
            lambda: gateway_metric(gw, "llm_gateway_replica_in_flight", endpoint=engine_b.url) >= 4, 120
        )
        kill_engine_hard(engine_b)  # the whole replica dies at once
        plain_r = [f.result() for f in plain_f]
        stream_r = [f.result() for f in stream_f]

    # Non-streamed requests had sent nothing to the client: every one completes (retried elsewhere).
    for r in plain_r:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == max_tokens
    assert gateway_metric(gw, "llm_gateway_retries_total") >= 1
    # A stream either completes or, if its replica died after it began, ends with an error event + [DONE].
    for status, lines in stream_r:
        events, done = sse_events(lines)
        assert status == 200 and done
        if any("error" in e for e in events):
            assert "error" in events[-1] and events[-1]["error"]["code"] == "upstream_disconnected"
            assert any(e.get("choices") for e in events[:-1])
        else:
            assert events[-1]["usage"]["completion_tokens"] == max_tokens
    # The pool goes on with the survivor.
    for i in range(3):
        assert plain(100 + i).status_code == 200
