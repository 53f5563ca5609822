"""GatewayMetrics: bounded labels, counts per finished request, scrape-time gauges from the shared state."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit.config import AuditSettings
from gateway.audit.sink import StdoutSink
from gateway.audit.writer import AuditWriter
from gateway.auth.principal import Principal
from gateway.context import RequestContext
from gateway.metrics import BoundedLabel, GatewayMetrics, TelemetrySources
from gateway.outcome import Outcome
from gateway.quota.metrics import QuotaMetrics
from gateway.routing.pool import EndpointPool
from gateway.routing.router import Router
from gateway.settings import GatewaySettings, RoutingSettings


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
        setattr(c, k, Outcome(v) if k == "decision" else v)
    c.finished = c.started + 0.2
    return c


def test_bounded_label_allow_list_dynamic_slots_and_other():
    b = BoundedLabel(["a", "b"], dynamic=2, reserved=["unauthenticated"])
    assert [b(x) for x in ["a", "x", "y", "z", "x", "unauthenticated", None, "b"]] == [
        "a",
        "x",
        "y",
        "other",
        "x",
        "unauthenticated",
        "other",
        "b",
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
    assert (
        value(
            m,
            "llm_gateway_requests_total",
            model="tiny",
            route="/v1/chat/completions",
            status_class="2xx",
            decision="allowed",
            tenant="other",
        )
        == 2
    )


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


async def test_tokens_upstream_errors_and_histograms():
    m = GatewayMetrics(models=["tiny"], tenants=["t"])
    await m.on_request_end(
        ctx_for(
            "t",
            status=200,
            prompt_tokens=7,
            completion_tokens=5,
            attempts=3,
            upstream_errors=["connect", "http_5xx"],
            ttft=0.05,
            chunk_gaps=[0.01, 0.02],
            stream=True,
            forwarded_at=None,
        )
    )
    await m.on_request_end(
        ctx_for("t", status=200, prompt_tokens=3, completion_tokens=2, attempts=1, ttft=0.2)
    )
    await m.on_request_end(ctx_for("t", status=429, decision="rate_limited", reason="tokens_per_minute"))
    await m.on_request_end(ctx_for("t", status=502, decision="upstream_error", upstream_errors=["weird"]))
    assert value(m, "llm_gateway_prompt_tokens_total", model="tiny", tenant="t") == 10
    assert value(m, "llm_gateway_completion_tokens_total", model="tiny", tenant="t") == 7
    assert value(m, "llm_gateway_upstream_errors_total", model="tiny", kind="connect") == 1
    assert value(m, "llm_gateway_upstream_errors_total", model="tiny", kind="http_5xx") == 1
    assert value(m, "llm_gateway_upstream_errors_total", model="tiny", kind="other") == 1
    assert (
        value(
            m,
            "llm_gateway_requests_total",
            model="tiny",
            route="/v1/chat/completions",
            status_class="4xx",
            decision="rate_limited",
            tenant="t",
        )
        == 1
    )
    assert value(m, "llm_gateway_inter_token_latency_seconds_count", model="tiny") == 2
    assert value(m, "llm_gateway_time_to_first_token_seconds_count", model="tiny") == 1
    assert (
        value(m, "llm_gateway_request_duration_seconds_count", model="tiny", route="/v1/chat/completions")
        == 4
    )


def _audit_writer(queue_size: int = 10) -> AuditWriter:
    """A real writer, not started: records put on its queue stay there (as when the sink is stuck)."""
    return AuditWriter(AuditSettings(enabled=True, queue_size=queue_size), sink=StdoutSink())


def test_state_gauges_read_at_scrape_time():
    pool = EndpointPool.from_urls("tiny", ["http://a:8000", "http://b:8000"])
    a, b = pool.endpoints
    state = SimpleNamespace(in_flight=0)
    m = GatewayMetrics(models=["tiny"])
    m.bind(TelemetrySources(pools={"tiny": pool}, router=Router(), in_flight=lambda: state.in_flight))
    names = {k[0] for k in samples(m)}
    # No audit writer, no quota: absent, not zero.
    assert "llm_gateway_audit_queue_depth" not in names and "llm_gateway_quota_rejected_total" not in names
    b.healthy = False
    a.in_flight, a.engine_waiting, a.engine_running, a.kv_cache_usage = 3, 2, 5, 0.25
    state.in_flight = 4
    ea, eb = {"model": "tiny", "endpoint": "http://a:8000"}, {"model": "tiny", "endpoint": "http://b:8000"}
    assert value(m, "llm_gateway_replicas", model="tiny") == 2
    assert value(m, "llm_gateway_replica_healthy", **ea) == 1
    assert value(m, "llm_gateway_replica_healthy", **eb) == 0
    assert value(m, "llm_gateway_replica_available", **eb) == 0
    assert value(m, "llm_gateway_replica_in_flight", **ea) == 3
    assert value(m, "llm_gateway_replica_engine_waiting", **ea) == 2
    assert value(m, "llm_gateway_replica_engine_running", **ea) == 5
    assert value(m, "llm_gateway_replica_kv_cache_usage_ratio", **ea) == 0.25
    assert value(m, "llm_gateway_in_flight_requests") == 4
    assert value(m, "llm_gateway_breaker_state", **ea, state="closed") == 1
    assert value(m, "llm_gateway_breaker_state", **ea, state="open") == 0


def test_audit_writer_snapshot_is_exported():
    pool = EndpointPool.from_urls("tiny", ["http://a:8000"])
    writer = _audit_writer(queue_size=5)
    for _ in range(3):
        writer.queue.put_nowait(ctx_for("t", status=200))
    writer.records_written, writer.write_errors, writer.rejected = 11, 2, 4
    m = GatewayMetrics(models=["tiny"])
    m.bind(TelemetrySources(pools={"tiny": pool}, audit=writer))
    assert value(m, "llm_gateway_audit_queue_depth") == 3
    assert value(m, "llm_gateway_audit_queue_capacity") == 5
    assert value(m, "llm_gateway_audit_records_written_total") == 11
    assert value(m, "llm_gateway_audit_write_errors_total") == 2
    assert value(m, "llm_gateway_audit_backpressure_total") == 4


def test_breaker_state_follows_the_real_breaker():
    # The breaker lives on Endpoint.breaker; three faults through the router open it.
    pool = EndpointPool.from_urls(
        "tiny", ["http://c:8000"], RoutingSettings(breaker_failures=3, breaker_open=60)
    )
    (ep,) = pool.endpoints
    router = Router(pool.settings)
    m = GatewayMetrics(models=["tiny"])
    m.bind(TelemetrySources(pools={"tiny": pool}, router=router))
    lv = {"model": "tiny", "endpoint": "http://c:8000"}
    assert value(m, "llm_gateway_breaker_state", **lv, state="closed") == 1
    ctx = RequestContext("r", "/v1/completions")
    for _ in range(3):
        router.on_failure(pool, ep, ctx, "5xx")
    assert value(m, "llm_gateway_breaker_state", **lv, state="open") == 1
    assert value(m, "llm_gateway_breaker_state", **lv, state="closed") == 0
    assert value(m, "llm_gateway_breaker_opened_total", **lv) == 1
    assert value(m, "llm_gateway_replica_faults_total", **lv) == 3
    assert value(m, "llm_gateway_replica_available", **lv) == 0
    # Once the open period is over the next request is a trial: half_open.
    ep.breaker.open_until = 0.0
    assert value(m, "llm_gateway_breaker_state", **lv, state="half_open") == 1
    router.on_success(pool, ep, ctx)
    assert value(m, "llm_gateway_breaker_state", **lv, state="closed") == 1


def test_retries_are_counted_once_per_model_by_the_router():
    pools = {
        name: EndpointPool.from_urls(name, ["http://a:8000", "http://b:8000"]) for name in ("tiny", "big")
    }
    router = Router(RoutingSettings(retry_min=1, retry_ratio=0.0), max_retries=5)
    m = GatewayMetrics(models=list(pools))
    m.bind(TelemetrySources(pools=pools, router=router))
    ctx = RequestContext("r", "/v1/completions")
    ctx.attempts = 1
    assert router.may_retry(pools["tiny"], ctx)
    assert not router.may_retry(pools["tiny"], ctx)  # the budget (1) is spent
    assert value(m, "llm_gateway_retries_total", model="tiny") == 1
    assert value(m, "llm_gateway_retries_refused_total", model="tiny") == 1
    assert value(m, "llm_gateway_retries_total", model="big") == 0
    # The observer no longer counts retries or quota refusals: one name each.
    names = {k[0] for k in samples(m)}
    assert "llm_gateway_upstream_retries_total" not in names
    assert "llm_gateway_quota_rejections_total" not in names


def test_quota_snapshot_is_exported_under_one_name():
    stats = QuotaMetrics()
    stats.rejected.labels("tokens").inc()
    stats.rejected.labels("tokens").inc()
    stats.rejected.labels("queue_full").inc()
    stats.backend_up.labels("redis").set(1)
    stats.queue_depth.labels("tiny").inc()
    m = GatewayMetrics(models=["tiny"])
    m.bind(TelemetrySources(pools={}, quota=stats))
    assert value(m, "llm_gateway_quota_rejected_total", reason="tokens") == 2
    assert value(m, "llm_gateway_quota_rejected_total", reason="queue_full") == 1
    assert value(m, "llm_gateway_quota_backend_up", backend="redis") == 1
    assert value(m, "llm_gateway_admission_queue_depth", model="tiny") == 1
