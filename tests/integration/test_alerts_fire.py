"""Every shipped alert can fire: each condition is forced against a real gateway process, its /metrics (and
the replicas' /metrics, as Prometheus would scrape them) are scraped, and promtool evaluates the shipped
rules (configs/prometheus/alerts.rules.yml) over series built from those scrapes.

How a scrape becomes a series (tests/monitoring.py ``timeline``): an hour of the state before the condition,
then the condition as observed between two scrapes taken while it was forced, persisting: counters grow by
what they grew between the two scrapes every 15 s scrape interval, gauges keep their trend. Each scenario
states exactly which alerts fire (and no other does); a quiet gateway fires none.

Upstream faults and engine load come from the simulated upstream (scripts/sim_upstream.py): a real vLLM
cannot be made to fail, fill its KV cache or queue on demand. The GPU alert reads the engine exporter's
collector over a stub NVML (no GPU here). Everything else (routing, breakers, health checks, quotas, the
audit writer, the metrics) is the real gateway.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine import metrics as engine_metrics
from tests.conftest import KEY_ALL, MODEL, gateway_config
from tests.monitoring import (
    PROMTOOL_STEP,
    SeriesKey,
    alert_names_used,
    alert_rules,
    failed_scrape,
    promtool_alert_test,
    scrape_samples,
    timeline,
)
from tests.support import Gateway, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)

AUTH = {"authorization": f"Bearer {KEY_ALL}"}
QUIET_STEPS = 65 * 60 // PROMTOOL_STEP  # an hour and more of the state before: the 1h windows see it
GATEWAY = {"job": "llm-gateway", "instance": "gateway:8080"}


def _target(job: str, url: str) -> dict[str, str]:
    return {"job": job, "instance": urlparse(url).netloc}


@dataclass
class Scrapes:
    """One scrape round of every target: the samples, and which are cumulative."""

    values: dict[SeriesKey, float] = field(default_factory=dict)
    cumulative: set[SeriesKey] = field(default_factory=set)

    def add_text(self, text: str, target: dict[str, str]) -> None:
        v, c = scrape_samples(text, target)
        self.values.update(v)
        self.cumulative |= c

    def add_url(self, url: str, target: dict[str, str]) -> None:
        try:
            r = httpx.get(url, timeout=5)
            r.raise_for_status()
        except httpx.HTTPError:
            self.values.update(failed_scrape(target))
        else:
            self.add_text(r.text, target)


def scrape_round(
    gw: Gateway | None, engines: list[str], extra: Callable[[Scrapes], None] | None = None
) -> Scrapes:
    s = Scrapes()
    if gw is not None:
        s.add_url(gw.metrics_url, GATEWAY)
    for url in engines:
        s.add_url(url + "/metrics", _target("vllm", url))
    if extra is not None:
        extra(s)
    return s


# Which alerts each scenario below fires (and no other): together, every shipped alert.
SCENARIOS: dict[str, set[str]] = {
    "quiet": set(),
    "slow": {"LlmTimeToFirstTokenP99High", "LlmRequestLatencyP99High"},
    "breaker": {"LlmCircuitBreakerOpen", "LlmGatewayErrorRatioHigh", "LlmUpstreamErrors"},
    "replicas": {"LlmReplicaDown", "LlmNoHealthyReplica", "LlmEngineScrapeDown"},
    "quota": {"LlmQuotaRejectionsSurge"},
    "audit": {"LlmAuditQueueFilling"},
    "engine": {"LlmKvCacheNearlyFull", "LlmEngineQueueBacklog"},
    "gpu": {"LlmGpuUtilizationHigh"},
    "weights": {"LlmEngineWeightsSourceUnreachable"},
}


def prove(
    tmp_path: Path,
    name: str,
    quiet: Scrapes,
    start: Scrapes,
    end: Scrapes,
    firing: dict[str, dict[str, str]],
    active_minutes: int = 20,
) -> None:
    assert set(firing) == SCENARIOS[name]
    names = alert_names_used(alert_rules())
    active = active_minutes * 60 // PROMTOOL_STEP
    series = timeline(
        quiet.values, start.values, end.values, start.cumulative | end.cumulative, QUIET_STEPS, active, names
    )
    assert series, "no series of the alert rules in the scrapes"
    promtool_alert_test(tmp_path / f"{name}.test.yml", series, QUIET_STEPS + active, firing)


def _complete(c: httpx.Client, stream: bool = False, **kw: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": stream, **kw}
    return c.post("/v1/completions", headers=AUTH, json=body)


# -- scenarios ------------------------------------------------------------------------------------------------


def test_a_quiet_gateway_fires_nothing(tmp_path, fake_upstream_factory, routing_gateway):
    up = fake_upstream_factory("ok")
    gw = routing_gateway(gateway_config([up.url]))
    rounds = []
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        for _ in range(3):
            for i in range(4):
                assert _complete(c, stream=bool(i % 2)).status_code == 200
            rounds.append(scrape_round(gw, [up.url]))
    prove(tmp_path, "quiet", *rounds, firing={})


def test_slow_first_token_fires_the_latency_alerts(tmp_path, fake_upstream_factory, routing_gateway):
    up = fake_upstream_factory("slow_first_byte", delay=0.7)
    gw = routing_gateway(gateway_config([up.url]))
    quiet = scrape_round(gw, [up.url])
    rounds = []
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        for _ in range(2):
            for _ in range(3):
                assert _complete(c, stream=True).status_code == 200
            rounds.append(scrape_round(gw, [up.url]))
    prove(
        tmp_path,
        "slow",
        quiet,
        *rounds,
        firing={"LlmTimeToFirstTokenP99High": {"model": MODEL}, "LlmRequestLatencyP99High": {"model": MODEL}},
    )


def test_failing_upstream_opens_the_breaker_and_fires_the_breaker_and_error_alerts(
    tmp_path, fake_upstream_factory, routing_gateway
):
    up = fake_upstream_factory("error500")
    routing = {"breaker_failures": 2, "breaker_open": 3600, "breaker_max_open": 3600}
    gw = routing_gateway(gateway_config([up.url], routing=routing, max_retries=0))
    quiet = scrape_round(gw, [up.url])
    rounds = []
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        for _ in range(2):
            for _ in range(4):
                assert _complete(c).status_code >= 500
            rounds.append(scrape_round(gw, [up.url]))
    # The breaker really is open (the gauge reads the replica's breaker, not a default).
    open_key = (
        "llm_gateway_breaker_state",
        tuple(sorted({**GATEWAY, "model": MODEL, "endpoint": up.url, "state": "open"}.items())),
    )
    assert rounds[0].values[open_key] == 1 and rounds[1].values[open_key] == 1
    prove(
        tmp_path,
        "breaker",
        quiet,
        *rounds,
        firing={
            "LlmCircuitBreakerOpen": {"model": MODEL, "endpoint": up.url},
            "LlmGatewayErrorRatioHigh": {"model": MODEL},
            "LlmUpstreamErrors": {"model": MODEL},
        },
    )


def test_replicas_going_down_fire_replica_down_no_healthy_replica_and_scrape_down(
    tmp_path, fake_upstream_factory, routing_gateway
):
    up, dying, dying_alone = (fake_upstream_factory("ok") for _ in range(3))
    cfg = gateway_config([up.url, dying.url], health_interval=0.2)
    cfg["models"].append({"name": "orphan", "upstreams": [dying_alone.url]})
    gw = routing_gateway(cfg)
    engines = [up.url, dying.url, dying_alone.url]

    def healthy(s: Scrapes, model: str, url: str) -> float:
        labels = {**GATEWAY, "model": model, "endpoint": url}
        return s.values[("llm_gateway_replica_healthy", tuple(sorted(labels.items())))]

    quiet = scrape_round(gw, engines)
    assert healthy(quiet, MODEL, dying.url) == 1 and healthy(quiet, "orphan", dying_alone.url) == 1
    dying.stop()
    dying_alone.stop()
    deadline = time.monotonic() + 20
    while healthy(scrape_round(gw, engines), "orphan", dying_alone.url) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    rounds = [scrape_round(gw, engines), scrape_round(gw, engines)]
    assert healthy(rounds[1], MODEL, dying.url) == 0 and healthy(rounds[1], MODEL, up.url) == 1
    prove(
        tmp_path,
        "replicas",
        quiet,
        *rounds,
        firing={
            "LlmReplicaDown": {"model": MODEL, "endpoint": dying.url},
            "LlmNoHealthyReplica": {"model": "orphan"},
            "LlmEngineScrapeDown": {"job": "vllm", "instance": urlparse(dying.url).netloc},
        },
    )


def test_a_tenant_hitting_its_rate_limit_fires_the_surge_alert(
    tmp_path, fake_upstream_factory, routing_gateway
):
    up = fake_upstream_factory("ok")
    gw = routing_gateway(gateway_config([up.url], quota={"default": {"rpm": 2}}))
    quiet = scrape_round(gw, [up.url])
    rounds = []
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        for _ in range(2):
            codes = [_complete(c).status_code for _ in range(20)]
            assert codes.count(429) >= 18
            rounds.append(scrape_round(gw, [up.url]))
    # Rate-limited now at 20 per scrape interval, never before: over 1/s and over 3x the hourly rate.
    prove(
        tmp_path,
        "quota",
        quiet,
        *rounds,
        firing={"LlmQuotaRejectionsSurge": {"tenant": "team-a"}},
        active_minutes=14,
    )


def test_a_stuck_audit_writer_fires_the_audit_queue_alert(tmp_path, fake_upstream_factory, routing_gateway):
    up = fake_upstream_factory("ok")
    # The writer takes the first record, then waits write_delay before writing: records pile up meanwhile,
    # as behind a stuck disk.
    audit = {"enabled": True, "path": str(tmp_path / "audit" / "audit.jsonl"), "write_delay": 20}
    gw = routing_gateway(gateway_config([up.url], audit=audit))
    quiet = scrape_round(gw, [up.url])
    rounds = []
    with httpx.Client(base_url=gw.url, timeout=30, headers=AUTH) as c:
        for _ in range(2):
            for _ in range(120):
                assert c.get("/v1/models").status_code == 200
            rounds.append(scrape_round(gw, [up.url]))
    depth = ("llm_gateway_audit_queue_depth", tuple(sorted(GATEWAY.items())))
    assert 100 < rounds[0].values[depth] < rounds[1].values[depth]
    prove(
        tmp_path, "audit", quiet, *rounds, firing={"LlmAuditQueueFilling": {"instance": GATEWAY["instance"]}}
    )


def test_engine_backlog_and_full_kv_cache_fire_the_engine_alerts(tmp_path, fake_upstream_factory):
    up = fake_upstream_factory("ok")
    quiet = scrape_round(None, [up.url])
    httpx.post(up.url + "/_mode", json={"waiting": 20, "running": 8, "kv_cache_usage": 0.97}, timeout=5)
    rounds = [scrape_round(None, [up.url]), scrape_round(None, [up.url])]
    instance = urlparse(up.url).netloc
    prove(
        tmp_path,
        "engine",
        quiet,
        *rounds,
        firing={
            "LlmKvCacheNearlyFull": {"instance": instance},
            "LlmEngineQueueBacklog": {"instance": instance},
        },
    )


class _StubNvml:
    """NVML as the engine exporter calls it, for one GPU that is ``busy`` percent busy (no GPU here)."""

    def __init__(self, busy: int) -> None:
        self.busy = busy

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return "GPU-stub-0"

    def nvmlDeviceGetName(self, h: int) -> str:
        return "stub"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self.busy, memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=1 << 30, total=80 << 30)


def test_a_busy_gpu_fires_the_scale_out_alert(tmp_path):
    nvml = _StubNvml(busy=30)
    registry = CollectorRegistry()
    registry.register(engine_metrics.GpuCollector(nvml))
    target = {"job": "llm-engine", "instance": "engine-0:9400"}

    def exporter(s: Scrapes) -> None:
        s.add_text(generate_latest(registry).decode(), target)

    quiet = scrape_round(None, [], exporter)
    nvml.busy = 95
    rounds = [scrape_round(None, [], exporter), scrape_round(None, [], exporter)]
    prove(
        tmp_path,
        "gpu",
        quiet,
        *rounds,
        firing={"LlmGpuUtilizationHigh": {"instance": "engine-0:9400"}},
        active_minutes=35,
    )


def test_an_engine_started_from_its_cache_while_s3_is_down_fires_the_weights_alert(tmp_path):
    # The real pull path (engine/weights.py) against a real S3 that is then stopped; the engine exporter over
    # HTTP. Its registry is process-wide: a source URI of this test's own keeps other pulls out.
    from engine.s3 import config_from_env
    from engine.weights import pull_model, push_model
    from tests.support import S3Server

    s3 = S3Server().wait_ready()
    port = free_port()
    exporter = engine_metrics.start_exporter(port, "127.0.0.1")
    assert exporter is not None
    target = {"job": "llm-engine", "instance": f"127.0.0.1:{port}"}
    uri = f"s3://models/alerts-{port}"
    try:
        s3.client().make_bucket("models")
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text("{}")
        cfg = config_from_env(s3.env())
        push_model(model, uri, cfg=cfg)
        pull_model(uri, tmp_path / "cache", cfg=cfg, live_progress=False)
        quiet = scrape_round(None, [], lambda s: s.add_url(f"http://127.0.0.1:{port}/metrics", target))
        s3.stop()
        assert pull_model(uri, tmp_path / "cache", cfg=cfg, live_progress=False).stats.source_unreachable
        rounds = [
            scrape_round(None, [], lambda s: s.add_url(f"http://127.0.0.1:{port}/metrics", target))
            for _ in range(2)
        ]
    finally:
        exporter.shutdown()
        s3.stop()
    prove(
        tmp_path,
        "weights",
        quiet,
        *rounds,
        firing={"LlmEngineWeightsSourceUnreachable": {"instance": target["instance"], "source": uri}},
    )


def test_every_shipped_alert_has_a_scenario_that_fires_it():
    shipped = {r["alert"] for r in alert_rules()}
    covered = set().union(*SCENARIOS.values())
    assert shipped - covered == set(), f"alerts no scenario forces: {sorted(shipped - covered)}"
    assert covered <= shipped
