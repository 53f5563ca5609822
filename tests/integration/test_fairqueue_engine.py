"""The fair queue in front of the real vLLM CPU engine: the per-replica budget holds (also when the
gateway's worker processes share it), a light tenant is served before a heavy tenant's backlog, saturated
requests are shed with 503 + Retry-After, every slot comes back (completed, failed upstream, client gone
mid-stream or while queued), and the class's priority reaches vLLM."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import MODEL, default_keys, gateway_config
from tests.support import scrape_sum, sha256_hex
from tests.support import wait_for as support_wait_for

KEY_HEAVY = "sk-test-fair-heavy"
KEY_LIGHT = "sk-test-fair-light"
KEY_BATCH_ONLY = "sk-test-fair-batch-only"
COMPLETIONS = "/v1/completions"


def hold_body() -> dict:
    """A stream that holds its slot while the test looks: far more output (16 x 1000 tokens with logprobs,
    ~10 MB) than socket buffers take, so the gateway waits on a client that reads slowly or not at all."""
    return dict(body(1000), n=16, logprobs=5, temperature=1.0)


def keys() -> list[dict[str, Any]]:
    return [
        *default_keys(),
        {"id": "heavy", "sha256": sha256_hex(KEY_HEAVY), "tenant": "heavy"},
        {"id": "light", "sha256": sha256_hex(KEY_LIGHT), "tenant": "light"},
        {"id": "etl", "sha256": sha256_hex(KEY_BATCH_ONLY), "tenant": "etl"},
    ]


def fair_gateway(engine, gateway_factory, workers: int = 1, **fair: Any):
    cfg = gateway_config([engine.url], api_keys=keys(), fair_queue={"enabled": True, **fair}, workers=workers)
    # The long streams below start slowly on a busy 2-core box: generous upstream timeouts.
    cfg["models"][0]["timeouts"] = {"first_byte": 300, "idle": 300}
    return gateway_factory(cfg)


def body(max_tokens: int, stream: bool = True, prompt: str = "Once upon a time") -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def auth(key: str, cls: str | None = None) -> dict[str, str]:
    h = {"authorization": f"Bearer {key}"}
    if cls:
        h["x-priority-class"] = cls
    return h


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    return scrape_sum(url, name, labels)


def wait_for(cond, timeout: float = 60.0, what: str = "condition"):
    return support_wait_for(cond, timeout, what)


@contextlib.contextmanager
def engine_peak(engine) -> Iterator[dict[str, float]]:
    """While the block runs, sample the engine's running + waiting requests every 50 ms; the yielded dict's
    ``engine`` is the peak seen."""
    peak = {"engine": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            load = engine.metric("vllm:num_requests_running") + engine.metric("vllm:num_requests_waiting")
            peak["engine"] = max(peak["engine"], load)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


async def stream_first_token(
    c: httpx.AsyncClient, url: str, key: str, max_tokens: int, order: list[str], name: str
) -> int:
    """Stream one completion; append ``name`` to ``order`` when its first content event arrives."""
    async with c.stream("POST", url + COMPLETIONS, json=body(max_tokens), headers=auth(key)) as r:
        first = True
        async for line in r.aiter_lines():
            if first and line.startswith("data: {"):
                order.append(name)
                first = False
        return r.status_code


@pytest.mark.engine
def test_budget_holds_and_light_tenant_skips_the_heavy_backlog(engine, gateway_factory):
    # Generous budgets: this test is about order, not shedding.
    gw = fair_gateway(
        engine, gateway_factory, slots_per_replica=2, classes={"interactive": {"max_wait": 600}}
    )
    order: list[str] = []

    async def main() -> tuple[list[int], int, float]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=32)) as c:
            heavy = [
                asyncio.ensure_future(stream_first_token(c, gw.url, KEY_HEAVY, 500, order, f"heavy{i}"))
                for i in range(10)
            ]
            # Wait until the heavy backlog is queued in the gateway, then the light tenant asks once.
            while metric(gw.metrics_url, "llm_gateway_fair_queue_depth", {"tenant": "heavy"}) < 5:
                await asyncio.sleep(0.05)
            queued_then = metric(gw.metrics_url, "llm_gateway_fair_queue_depth", {"tenant": "heavy"})
            light = await stream_first_token(c, gw.url, KEY_LIGHT, 8, order, "light")
            return list(await asyncio.gather(*heavy)), light, queued_then

    with engine_peak(engine) as peak:
        heavy_codes, light_code, queued_then = asyncio.run(main())
    assert heavy_codes == [200] * 10 and light_code == 200
    assert queued_then >= 5
    # The light request got one of the next slots: most of the heavy backlog started after it (FIFO: none).
    later = len(order) - 1 - order.index("light")
    assert later >= 3, order
    # The engine never held more than the budget (2 slots, one replica): the rest waited in the gateway.
    assert 1 <= peak["engine"] <= 2
    # Every slot came back; the waits were recorded per tenant.
    assert metric(gw.metrics_url, "llm_gateway_fair_slots_in_use") == 0
    assert metric(gw.metrics_url, "llm_gateway_fair_slots") == 2
    assert metric(gw.metrics_url, "llm_gateway_fair_queue_wait_seconds_count", {"tenant": "heavy"}) == 10
    assert (
        metric(
            gw.metrics_url,
            "llm_gateway_fair_queue_wait_seconds_count",
            {"tenant": "light", "class": "interactive"},
        )
        == 1
    )


@pytest.mark.engine
def test_the_workers_of_one_gateway_share_its_budget(engine, gateway_factory):
    """Two worker processes, N=3 per replica: the workers hold 2 and 1 slots, so the engine never runs more
    than 3 requests from this gateway (each worker keeping its own 3 would let 6 through)."""
    gw = fair_gateway(
        engine, gateway_factory, workers=2, slots_per_replica=3, classes={"interactive": {"max_wait": 600}}
    )
    # Each scrape reaches one worker (they share the metrics port): the two shares, never N each.
    seen = {metric(gw.metrics_url, "llm_gateway_fair_slots") for _ in range(40)}
    assert seen == {1.0, 2.0}

    async def main() -> list[int]:
        # A client per request: new connections spread over both workers.
        async def one(i: int) -> int:
            async with httpx.AsyncClient(timeout=300) as c:
                return await stream_first_token(c, gw.url, KEY_HEAVY, 200, [], f"r{i}")

        return list(await asyncio.gather(*(one(i) for i in range(10))))

    with engine_peak(engine) as peak:
        codes = asyncio.run(main())
    assert codes == [200] * 10
    assert 1 <= peak["engine"] <= 3


@pytest.mark.engine
def test_saturated_requests_are_shed_at_once_with_retry_after(engine, gateway_factory):
    gw = fair_gateway(
        engine,
        gateway_factory,
        slots_per_replica=1,
        classes={"interactive": {"rank": 0, "max_wait": 0.01}, "batch": {"rank": 1, "max_wait": 600}},
        tenants={"etl": {"classes": ["batch"]}},
    )
    url = gw.url + COMPLETIONS
    # Unknown or forbidden classes are clear errors, and hold no slot.
    r = httpx.post(url, json=body(4, stream=False), headers=auth(KEY_LIGHT, "urgent"), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_priority_class"
    r = httpx.post(url, json=body(4, stream=False), headers=auth(KEY_BATCH_ONLY, "interactive"), timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "priority_class_not_allowed"
    # One request measures how long a slot is held.
    r = httpx.post(url, json=body(16, stream=False), headers=auth(KEY_LIGHT), timeout=120)
    assert r.status_code == 200
    assert metric(gw.metrics_url, "llm_gateway_fair_slot_hold_seconds") > 0
    # A batch stream holds the only slot; an interactive request now predicts a wait of about one slot
    # hold, past its 10 ms budget: 503 with Retry-After at once, not a late answer.
    with httpx.stream("POST", url, json=hold_body(), headers=auth(KEY_BATCH_ONLY), timeout=300) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # keep the iterator: dropping it closes the response
        next(lines)
        r = httpx.post(url, json=body(4, stream=False), headers=auth(KEY_LIGHT), timeout=60)
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "engine_overloaded" and "predicted wait" in err["message"]
        assert int(r.headers["retry-after"]) >= 1
    assert (
        metric(
            gw.metrics_url,
            "llm_gateway_fair_shed_total",
            {"reason": "predicted_wait", "class": "interactive"},
        )
        == 1
    )
    wait_for(
        lambda: metric(gw.metrics_url, "llm_gateway_fair_slots_in_use") == 0, what="the slot to come back"
    )


@pytest.mark.engine
def test_no_slot_leaks_on_disconnect_errors_or_leaving_the_queue(engine, gateway_factory):
    gw = fair_gateway(engine, gateway_factory, slots_per_replica=1)
    url = gw.url + COMPLETIONS

    def in_use() -> float:
        return metric(gw.metrics_url, "llm_gateway_fair_slots_in_use")

    # 1. The client goes away mid-stream.
    with httpx.stream("POST", url, json=hold_body(), headers=auth(KEY_HEAVY), timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        assert in_use() == 1
    wait_for(lambda: in_use() == 0, what="the slot of a client that left mid-stream")
    ended = metric(gw.metrics_url, "llm_gateway_requests_total", {"decision": "client_closed"})
    assert ended == 1  # it really left mid-stream
    # 2. The engine refuses the request (prompt + max_tokens beyond its context): the 400 is passed on.
    r = httpx.post(url, json=body(5000, stream=False), headers=auth(KEY_HEAVY), timeout=60)
    assert r.status_code == 400
    assert in_use() == 0
    # 3. A client gives up while queued behind a held slot.
    with httpx.stream("POST", url, json=hold_body(), headers=auth(KEY_HEAVY), timeout=300) as held:
        lines = held.iter_lines()  # keep the iterator: dropping it closes the response
        next(lines)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                url, json=body(4, stream=False), headers=auth(KEY_LIGHT), timeout=httpx.Timeout(60, read=0.5)
            )
        # It leaves the queue at once (the slot is still held by the first stream), not when it would
        # have been granted.
        wait_for(
            lambda: metric(gw.metrics_url, "llm_gateway_fair_queue_depth") == 0 and in_use() == 1,
            what="the queued request to leave while the slot is still held",
        )
    wait_for(
        lambda: in_use() == 0 and metric(gw.metrics_url, "llm_gateway_fair_queue_depth") == 0,
        what="queue and slots to empty",
    )
    # The single slot is free for the next request, and the engine ended everything it was sent.
    r = httpx.post(url, json=body(4, stream=False), headers=auth(KEY_LIGHT), timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert in_use() == 0
    wait_for(lambda: engine.metric("vllm:num_requests_running") == 0, what="the engine to finish")


@pytest.mark.engine
def test_class_priority_reaches_vllm(engine, gateway_factory):
    # vLLM validates `priority` as a 64-bit integer: a class whose engine_priority is out of that range is
    # refused by the engine, which shows the gateway put the class's priority into the request it forwarded.
    classes = {
        "interactive": {"rank": 0, "engine_priority": 0},
        "batch": {"rank": 1, "engine_priority": 2**63},
    }
    gw = fair_gateway(engine, gateway_factory, slots_per_replica=4, engine_priority=True, classes=classes)
    url = gw.url + COMPLETIONS
    r = httpx.post(url, json=body(2, stream=False), headers=auth(KEY_LIGHT, "interactive"), timeout=60)
    assert r.status_code == 200
    r = httpx.post(url, json=body(2, stream=False), headers=auth(KEY_LIGHT, "batch"), timeout=60)
    assert r.status_code == 400 and "priority" in r.json()["error"]["message"].lower()
    assert metric(gw.metrics_url, "llm_gateway_fair_slots_in_use") == 0
