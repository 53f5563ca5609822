"""Metrics after real traffic through the gateway to the real vLLM engine; configs/ reference only metrics
that a real scrape (gateway, vLLM, engine exporter) exports."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import metrics as engine_metrics
from tests.conftest import KEY_ALL, KEY_LIMITED, MODEL, gateway_config
from tests.monitoring import (
    alert_rules,
    dashboard_queries,
    dashboard_variable_metrics,
    scrape_names,
    selector_names,
)

pytestmark = pytest.mark.engine

# Names configs/ may reference that no scrape in this test can show, each for a stated reason and each
# checked another way below:
PROMETHEUS_SYNTHETIC = {"up"}  # made by Prometheus itself for every target
GPU_ONLY = set(engine_metrics.GPU_METRIC_NAMES)  # exported by engine/metrics.py only where NVML sees a GPU

AUTH = {"authorization": f"Bearer {KEY_ALL}"}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url, timeout=10).text
    out: dict[tuple[str, tuple], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **match: str) -> float:
    return sum(v for (n, lbl), v in samples.items() if n == name and all(dict(lbl).get(k) == w for k, w in match.items()))


def sse_usage(text: str) -> dict | None:
    usage = None
    for line in text.splitlines():
        if line.startswith("data: {"):
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
    return usage


@pytest.fixture(scope="module")
def obs_gateway(engine, gateway_factory, tmp_path_factory):
    """A gateway of its own, so its counters hold only this module's traffic; audit, quotas and the fair queue
    on (limits far above this traffic), so their metrics are in the scrape too."""
    audit = tmp_path_factory.mktemp("obs-audit") / "audit.jsonl"
    return gateway_factory(
        gateway_config(
            [engine.url],
            audit={"enabled": True, "path": str(audit)},
            quota={"default": {"rpm": 100_000}},
            # the fair queue on (far more slots than this traffic), so its metrics are in the scrape too
            fair_queue={"enabled": True, "slots_per_replica": 64},
        )
    )


def test_counters_and_histograms_match_the_traffic_sent(obs_gateway, engine):
    g = obs_gateway
    vllm_before = scrape(engine.url + "/metrics")
    usages: list[dict] = []
    with httpx.Client(base_url=g.url, timeout=120) as c:
        for i in range(3):
            r = c.post("/v1/completions", headers=AUTH, json={
                "model": MODEL, "prompt": "count " * (i + 1), "max_tokens": 4 + i, "ignore_eos": True})
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
        for i in range(3):
            r = c.post("/v1/chat/completions", headers=AUTH, json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi " * (i + 1)}], "max_tokens": 6,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
            assert r.status_code == 200, r.text
            u = sse_usage(r.text)
            assert u is not None and u["completion_tokens"] == 6
            usages.append(u)
        # A stream whose client did not ask for usage: the gateway still counts it (from the hidden chunk).
        r = c.post("/v1/chat/completions", headers=AUTH, json={
            "model": MODEL, "messages": [{"role": "user", "content": "quiet"}], "max_tokens": 5, "ignore_eos": True,
            "stream": True})
        assert r.status_code == 200 and sse_usage(r.text) is None
        r = c.post("/generate", headers=AUTH, json={"model": MODEL, "prompt": "seed route", "max_tokens": 3})
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
        # Refusals: no key, a key without this model, an unknown model.
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
        limited = {"authorization": f"Bearer {KEY_LIMITED}"}
        assert c.post("/v1/completions", headers=limited, json={"model": MODEL, "prompt": "x"}).status_code in (403, 404)
        assert c.post("/v1/completions", headers=AUTH, json={"model": "no-such", "prompt": "x"}).status_code == 404
    m = scrape(g.metrics_url)
    vllm_after = scrape(engine.url + "/metrics")

    ok = 3 + 3 + 1 + 1
    assert total(m, "llm_gateway_requests_total", status_class="2xx", decision="allowed", tenant="team-a", model=MODEL) == ok
    assert total(m, "llm_gateway_requests_total", route="/v1/completions", status_class="2xx") == 3
    assert total(m, "llm_gateway_requests_total", route="/v1/chat/completions", status_class="2xx") == 4
    assert total(m, "llm_gateway_requests_total", route="/generate", status_class="2xx") == 1
    assert total(m, "llm_gateway_requests_total", decision="unauthenticated", tenant="unauthenticated") == 1
    assert total(m, "llm_gateway_requests_total", tenant="team-b", status_class="4xx") == 1
    assert total(m, "llm_gateway_requests_total", decision="not_found", model="none") == 1
    assert total(m, "llm_gateway_requests_total") == ok + 3

    # Tokens: the usage the clients saw, plus the hidden stream's (exact completion count with ignore_eos)...
    prompt_seen = sum(u["prompt_tokens"] for u in usages)
    completion_seen = sum(u["completion_tokens"] for u in usages)
    gw_prompt = total(m, "llm_gateway_prompt_tokens_total", model=MODEL, tenant="team-a")
    gw_completion = total(m, "llm_gateway_completion_tokens_total", model=MODEL, tenant="team-a")
    assert gw_completion == completion_seen + 5
    assert gw_prompt > prompt_seen  # the hidden stream's prompt is in there too
    # ...and, over this window, exactly what the engine itself counted.
    assert gw_prompt == total(vllm_after, "vllm:prompt_tokens_total") - total(vllm_before, "vllm:prompt_tokens_total")
    assert gw_completion == total(vllm_after, "vllm:generation_tokens_total") - total(vllm_before, "vllm:generation_tokens_total")

    # Histograms: one latency sample per request, overhead per forwarded 200, TTFT and ITL from streams.
    assert total(m, "llm_gateway_request_duration_seconds_count") == ok + 3
    assert total(m, "llm_gateway_time_to_first_token_seconds_count", model=MODEL) == 4  # the streamed ones
    assert total(m, "llm_gateway_overhead_seconds_count") == ok
    assert total(m, "llm_gateway_inter_token_latency_seconds_count", model=MODEL) > 0
    for h in ("llm_gateway_request_duration_seconds", "llm_gateway_time_to_first_token_seconds"):
        assert total(m, h + "_sum") > 0
        inf = total(m, h + "_bucket", le="+Inf")
        assert inf == total(m, h + "_count")
    assert total(m, "llm_gateway_retries_total") == 0
    assert total(m, "llm_gateway_in_flight_requests") == 0
    assert total(m, "llm_gateway_replica_healthy", model=MODEL, endpoint=engine.url) == 1
    assert total(m, "llm_gateway_breaker_state", model=MODEL, endpoint=engine.url, state="closed") == 1


class _FaultHandler(BaseHTTPRequestHandler):
    """Fault injection: a replica that passes /health but answers 503 to every request."""

    protocol_version = "HTTP/1.1"
    hits = 0

    def log_message(self, *a) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200 if self.path == "/health" else 404, b"{}")

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        type(self).hits += 1
        self._send(503, b'{"error": {"message": "overloaded", "type": "server_error", "param": null, "code": null}}')


def test_upstream_faults_count_by_kind_and_retries(engine, gateway_factory):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FaultHandler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        bad = f"http://127.0.0.1:{server.server_address[1]}"
        g = gateway_factory(gateway_config([bad, engine.url], health_interval=0.2))
        sent = 0
        with httpx.Client(base_url=g.url, timeout=120) as c:
            # Ties between idle replicas are broken at random: send until the faulty one was tried (at least 4).
            while sent < 4 or (_FaultHandler.hits == 0 and sent < 30):
                prompt = f"x{sent}"  # a prompt of its own each time: no affinity to one replica
                r = c.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
                assert r.status_code == 200, r.text
                sent += 1
        m = scrape(g.metrics_url)
    finally:
        server.shutdown()
    hits = _FaultHandler.hits
    assert hits >= 1
    assert total(m, "llm_gateway_upstream_errors_total", model=MODEL, kind="http_5xx") == hits
    assert total(m, "llm_gateway_retries_total", model=MODEL) == hits
    assert total(m, "llm_gateway_requests_total", status_class="2xx") == sent


def test_every_metric_in_dashboard_and_alerts_exists_in_a_real_scrape(obs_gateway, engine):
    exported = set()
    for url in (obs_gateway.metrics_url, engine.url + "/metrics", engine.metrics_url):
        exported |= scrape_names(httpx.get(url, timeout=10).text)
    referenced: dict[str, str] = {}
    for r in alert_rules():
        for n in selector_names(r["expr"]):
            referenced.setdefault(n, "alert " + r["alert"])
    for title, q in dashboard_queries():
        for n in selector_names(q):
            referenced.setdefault(n, "panel " + title)
    for n in dashboard_variable_metrics():
        referenced.setdefault(n, "dashboard variable")
    assert any(n.startswith("vllm:") for n in referenced) and any(n.startswith("llm_engine_") for n in referenced)

    missing = {n: where for n, where in referenced.items() if n not in exported}
    # The allow-listed ones must be accounted for, each in its own way.
    assert set(missing) - PROMETHEUS_SYNTHETIC - GPU_ONLY == set(), missing
    declared_gpu = {f.name for f in engine_metrics.GpuCollector(nvml=None).describe()}
    assert GPU_ONLY <= declared_gpu
    if engine_metrics.load_nvml() is None:
        assert not GPU_ONLY & exported  # absent, not zero, without a GPU
