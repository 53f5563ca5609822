"""A rolling restart of one engine behind the gateway: SIGTERM reaches `llm-engine run` while a stream runs
on it. vLLM drains (--shutdown-timeout) so the stream completes in full, the engine exits 0, and the
gateway's pool goes on with the other replica."""

from __future__ import annotations

import signal
import threading

import httpx
import pytest

from gateway.routing.affinity import HashRing, affinity_key
from gateway.settings import RoutingSettings
from tests.conftest import KEY_ALL, MODEL, gateway_config
from tests.fixtures_routing import sse_events
from tests.support import Engine

pytestmark = pytest.mark.engine

AUTH = {"Authorization": f"Bearer {KEY_ALL}"}


def test_sigterm_to_an_engine_finishes_its_stream_and_the_pool_goes_on(
    engine, tiny_model_dir, routing_gateway
):
    leaving = Engine(str(tiny_model_dir), served_name=MODEL, extra_env={"ENGINE_DRAIN_TIMEOUT": "60"})
    try:
        leaving.wait_ready()
        gw = routing_gateway(
            gateway_config([engine.url, leaving.url], health_interval=0.3, routing={"retry_min": 100})
        )
        ring = HashRing([engine.url, leaving.url], RoutingSettings().virtual_nodes)
        sid = next(
            s
            for s in (f"s{i}" for i in range(1000))
            if next(ring.walk(affinity_key(None, 1024, session=s))) == leaving.url
        )
        started = threading.Event()
        result: dict = {}

        def run() -> None:
            body = {
                "model": MODEL,
                "prompt": "Story:",
                "max_tokens": 700,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            headers = dict(AUTH, **{"x-session-id": sid})
            with httpx.stream(
                "POST", gw.url + "/v1/completions", json=body, headers=headers, timeout=300
            ) as r:
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()
                result["status"], result["lines"] = r.status_code, lines

        t = threading.Thread(target=run)
        t.start()
        assert started.wait(120)
        before = leaving.metric("vllm:request_success_total")
        leaving.proc.signal(signal.SIGTERM)
        t.join(300)
        events, done = sse_events(result["lines"])
        assert result["status"] == 200 and done
        assert not any("error" in e for e in events)
        assert events[-1]["usage"]["completion_tokens"] == 700
        assert before == 0  # the stream was still running on the leaving engine when SIGTERM came
        assert leaving.proc.proc.wait(90) == 0
        # The replica is gone; the same session now lands on the survivor.
        for _ in range(3):
            r = httpx.post(
                gw.url + "/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                headers=dict(AUTH, **{"x-session-id": sid}),
                timeout=120,
            )
            assert r.status_code == 200
    finally:
        leaving.stop()


@pytest.mark.timeout(900)  # two engines start on a busy 2-core machine
def test_rolling_replacement_under_load_drops_no_request(engine, tiny_model_dir, routing_gateway):
    """The documented roll (docs/deploy.md): the new replica (here the session's engine) is ready before the
    old one gets SIGTERM. Under continuous streamed and non-streamed load across the switch, every request
    succeeds and every stream is complete: vLLM drains what it runs (--shutdown-timeout), and what it no
    longer accepts is retried on the new replica before anything reached the client."""
    old = Engine(str(tiny_model_dir), served_name=MODEL, extra_env={"ENGINE_DRAIN_TIMEOUT": "30"})
    try:
        old.wait_ready()
        gw = routing_gateway(
            gateway_config(
                [old.url, engine.url],
                health_interval=0.3,
                max_retries=3,
                routing={"retry_min": 1000, "policy": "least_outstanding"},
            )
        )
        stop = threading.Event()
        outcomes: list[tuple[str, int, bool]] = []  # (kind, status, complete)

        def worker(w: int) -> None:
            with httpx.Client(base_url=gw.url, headers=AUTH, timeout=120) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    body = {"model": MODEL, "prompt": f"w{w} r{i}", "max_tokens": 24, "ignore_eos": True}
                    if (w + i) % 2:
                        body |= {"stream": True, "stream_options": {"include_usage": True}}
                        with c.stream("POST", "/v1/completions", json=body) as r:
                            lines = list(r.iter_lines())
                        events, done = sse_events(lines)
                        ok = done and not any("error" in e for e in events) and bool(events)
                        ok = ok and events[-1].get("usage", {}).get("completion_tokens") == 24
                        outcomes.append(("stream", r.status_code, ok))
                    else:
                        r = c.post("/v1/completions", json=body)
                        ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 24
                        outcomes.append(("whole", r.status_code, ok))

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        while len(outcomes) < 8:  # both replicas are taking load
            assert all(t.is_alive() for t in threads)
            threading.Event().wait(0.2)
        before_old = old.metric("vllm:request_success_total")
        old.proc.signal(signal.SIGTERM)
        assert old.proc.proc.wait(90) == 0, "the old replica drained and exited cleanly"
        n_at_exit = len(outcomes)
        while len(outcomes) < n_at_exit + 8:  # the new replica alone carries on
            threading.Event().wait(0.2)
        stop.set()
        for t in threads:
            t.join(180)
        bad = [o for o in outcomes if o[1] != 200 or not o[2]]
        assert not bad, f"{len(bad)} of {len(outcomes)} requests failed or were cut short: {bad[:5]}"
        assert before_old > 0, "the old replica served part of the load before it left"
    finally:
        stop_evt = locals().get("stop")
        if stop_evt is not None:
            stop_evt.set()
        old.stop()
