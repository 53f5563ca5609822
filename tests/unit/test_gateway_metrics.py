"""GatewayMetrics: bounded labels, counts per finished request, scrape-time gauges from the shared state."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.principal import Principal
from gateway.context import RequestContext
from gateway.metrics import BoundedLabel, GatewayMetrics
from gateway.routing.pool import EndpointPool
from gateway.settings import GatewaySettings


def samples(m: GatewayMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: GatewayMetrics, name: str, **labels: str) -> float:
    return samples(m).get((name, tuple(sorted(labels.items()))), 0.0)


def ctx_for(tenant: str | None, model: str = "tiny", **kw) -> RequestContext:
    c = RequestContext("req-1", "/v1/chat/completions")
    c.principal = Principal(subject="s", tenant=tenant) if tenant is not None else None
    c.model = model
    for k, v in kw.items():
        setattr(c, k, v)
    c.finished = c.started + 0.2
    return c


def test_bounded_label_allow_list_dynamic_slots_and_other():
    b = BoundedLabel(["a", "b"], dynamic=2, reserved=["unauthenticated"])
    assert [b(x) for x in ["a", "x", "y", "z", "x", "unauthenticated", None, "b"]] == [
        "a", "x", "y", "other", "x", "unauthenticated", "other", "b"
    ]
    # Odd values never become labels, even with slots left.
    assert BoundedLabel([], dynamic=5)("has spaces and {braces}") == "other"


async def test_tenants_from_keys_plus_first_n_then_other():
    s = GatewaySettings(
        models=[{"name": "tiny", "upstreams": ["http://x"]}],
        api_keys=[{"id": "k", "sha256": "0" * 64, "tenant": "team-a"}],
        metrics={"tenant_top_n": 1},
    )
    m = GatewayMetrics.from_settings(s)
    for t in ["team-a", "jwt-1", "jwt-2", "jwt-3", None]:
        await m.on_request_end(ctx_for(t, status=200, endpoint="http://x"))
    tenants = {dict(k[1]).get("tenant") for k in samples(m) if k[0] == "llm_gateway_requests_total"}
    assert tenants == {"team-a", "jwt-1", "other", "unauthenticated"}
    assert value(m, "llm_gateway_requests_total", model="tiny", route="/v1/chat/completions", status_class="2xx",
                 decision="allowed", tenant="other") == 2


async def test_explicit_tenant_allow_list_folds_everything_else():
    s = GatewaySettings(models=[{"name": "tiny", "upstreams": ["http://x"]}], metrics={"tenants": ["gold"]})
    m = GatewayMetrics.from_settings(s)
    await m.on_request_end(ctx_for("gold", status=200))
    await m.on_request_end(ctx_for("silver", status=200))
    tenants = {dict(k[1]).get("tenant") for k in samples(m) if k[0] == "llm_gateway_requests_total"}
    assert tenants == {"gold", "other"}


async def test_unknown_model_names_never_become_labels():
    m = GatewayMetrics(models=["tiny"])
    await m.on_request_end(ctx_for("t", model="made-up-by-client", status=404, decision="not_found"))
    models = {dict(k[1]).get("model") for k in samples(m) if k[0] == "llm_gateway_requests_total"}
    assert models == {"none"}


async def test_tokens_retries_upstream_errors_and_quota_rejections():
    m = GatewayMetrics(models=["tiny"], tenants=["t"])
    await m.on_request_end(ctx_for("t", status=200, prompt_tokens=7, completion_tokens=5, attempts=3,
                                   upstream_errors=["connect", "http_5xx"], ttft=0.05, chunk_gaps=[0.01, 0.02], stream=True,
                                   forwarded_at=None))
    await m.on_request_end(ctx_for("t", status=200, prompt_tokens=3, completion_tokens=2, attempts=1, ttft=0.2))
    await m.on_request_end(ctx_for("t", status=429, decision="rate_limited", reason="tokens_per_minute"))
    await m.on_request_end(ctx_for("t", status=502, decision="upstream_error", upstream_errors=["weird"]))
    assert value(m, "llm_gateway_prompt_tokens_total", model="tiny", tenant="t") == 10
    assert value(m, "llm_gateway_completion_tokens_total", model="tiny", tenant="t") == 7
    assert value(m, "llm_gateway_upstream_retries_total", model="tiny") == 2
    assert value(m, "llm_gateway_upstream_errors_total", model="tiny", kind="connect") == 1
    assert value(m, "llm_gateway_upstream_errors_total", model="tiny", kind="http_5xx") == 1
    assert value(m, "llm_gateway_upstream_errors_total", model="tiny", kind="other") == 1
    assert value(m, "llm_gateway_quota_rejections_total", model="tiny", tenant="t", reason="tokens_per_minute") == 1
    assert value(m, "llm_gateway_inter_token_latency_seconds_count", model="tiny") == 2
    assert value(m, "llm_gateway_time_to_first_token_seconds_count", model="tiny") == 1
    assert value(m, "llm_gateway_request_duration_seconds_count", model="tiny", route="/v1/chat/completions") == 4


class _AuditWithQueue:
    """The audit writer's contract as metrics reads it: ``queue_depth()``."""

    def __init__(self) -> None:
        self.pending: list[dict] = []

    def queue_depth(self) -> int:
        return len(self.pending)


def test_state_gauges_read_at_scrape_time():
    pool = EndpointPool.from_urls("tiny", ["http://a:8000", "http://b:8000"])
    a, b = pool.endpoints
    state = SimpleNamespace(pools={"tiny": pool}, in_flight=0)
    m = GatewayMetrics(models=["tiny"])
    m.bind_state(state)
    names = {k[0] for k in samples(m)}
    assert "llm_gateway_audit_queue_depth" not in names  # no audit writer: absent, not zero
    b.healthy = False
    a.in_flight, a.engine_waiting, a.engine_running, a.kv_cache_usage = 3, 2, 5, 0.25
    state.in_flight = 4
    state.audit = _AuditWithQueue()
    state.audit.pending.extend([{}, {}, {}])
    ea, eb = {"model": "tiny", "endpoint": "http://a:8000"}, {"model": "tiny", "endpoint": "http://b:8000"}
    assert value(m, "llm_gateway_replica_healthy", **ea) == 1
    assert value(m, "llm_gateway_replica_healthy", **eb) == 0
    assert value(m, "llm_gateway_replica_in_flight", **ea) == 3
    assert value(m, "llm_gateway_replica_engine_waiting", **ea) == 2
    assert value(m, "llm_gateway_replica_engine_running", **ea) == 5
    assert value(m, "llm_gateway_replica_kv_cache_usage_ratio", **ea) == 0.25
    assert value(m, "llm_gateway_in_flight_requests") == 4
    assert value(m, "llm_gateway_audit_queue_depth") == 3
    # Endpoint has no breaker yet: every replica reads "closed" (1) until the breaker adds the field.
    assert value(m, "llm_gateway_breaker_state", **ea, state="closed") == 1
    assert value(m, "llm_gateway_breaker_state", **ea, state="open") == 0


def test_breaker_state_attribute_is_reported_when_present():
    ep = SimpleNamespace(url="http://c:8000", healthy=True, in_flight=0, engine_waiting=0, engine_running=0,
                         kv_cache_usage=0.0, breaker_state="half_open")
    state = SimpleNamespace(pools={"tiny": SimpleNamespace(endpoints=[ep])}, in_flight=0)
    m = GatewayMetrics(models=["tiny"])
    m.bind_state(state)
    lv = {"model": "tiny", "endpoint": "http://c:8000"}
    assert value(m, "llm_gateway_breaker_state", **lv, state="half_open") == 1
    assert value(m, "llm_gateway_breaker_state", **lv, state="closed") == 0
