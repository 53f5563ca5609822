"""The admission hook against a real redis-server (and the in-process backend): exact limits under
concurrency, one limit shared by independent limiter instances, exact settlement, fail open / closed."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from gateway.auth.principal import Principal
from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.quota.admission import QuotaAdmission
from gateway.quota.config import QuotaSettings
from gateway.quota.limits import PERIOD
from gateway.quota.metrics import QuotaMetrics


def settings(backend: str, url: str | None = None, **limits) -> QuotaSettings:
    # A generous timeout: these tests are about exact counting, not about a slow Redis on a loaded CI box.
    cfg = {
        "backend": backend, "key_prefix": f"test:{uuid.uuid4().hex}:", "default": limits, "default_max_tokens": 10,
        "redis_timeout": 5.0,
    }
    if url:
        cfg["redis_url"] = url
    return QuotaSettings.model_validate(cfg)


def request(subject: str = "alice", max_tokens: int | None = None) -> RequestContext:
    c = RequestContext("r", "/v1/completions")
    c.principal = Principal(subject, tenant="team")
    c.model = "tiny"
    c.body = {"prompt": "hello world!"}
    c.prompt_chars = 12
    c.max_tokens = max_tokens
    return c


async def try_admit(adm: QuotaAdmission, ctx: RequestContext):
    try:
        return await adm.admit(ctx)
    except ApiError as e:
        return e


@pytest.fixture(params=["memory", "redis"])
def backend_url(request):
    if request.param == "memory":
        return "memory", None
    return "redis", request.getfixturevalue("redis_server").url


async def test_rpm_exact_under_concurrency(backend_url):
    backend, url = backend_url
    adm = QuotaAdmission(settings(backend, url, rpm=10), QuotaMetrics())
    try:
        results = await asyncio.gather(*(try_admit(adm, request()) for _ in range(30)))
        refused = [r for r in results if isinstance(r, ApiError)]
        assert len(results) - len(refused) == 10
        assert len(refused) == 20 and {e.status for e in refused} == {429}
        assert all(1 <= int(e.headers["retry-after"]) <= 6 for e in refused)
    finally:
        await adm.close()


async def test_concurrency_limit_exact_and_released(backend_url):
    backend, url = backend_url
    adm = QuotaAdmission(settings(backend, url, max_concurrent=3), QuotaMetrics())
    try:
        results = await asyncio.gather(*(try_admit(adm, request()) for _ in range(12)))
        tickets = [r for r in results if not isinstance(r, ApiError)]
        assert len(tickets) == 3
        await tickets[0].settle(request())
        assert not isinstance(await try_admit(adm, request()), ApiError)
        assert isinstance(await try_admit(adm, request()), ApiError)
    finally:
        await adm.close()


async def test_two_limiter_instances_share_one_redis_limit(redis_server):
    s = settings("redis", redis_server.url, rpm=10)
    a = QuotaAdmission(s, QuotaMetrics())
    b = QuotaAdmission(s, QuotaMetrics())
    try:
        results = await asyncio.gather(*(try_admit(a if i % 2 else b, request()) for i in range(24)))
        assert sum(not isinstance(r, ApiError) for r in results) == 10
        # Another principal has its own budget.
        assert not isinstance(await try_admit(a, request("bob")), ApiError)
    finally:
        await a.close()
        await b.close()


async def test_redis_settlement_moves_the_counter_by_real_usage(redis_server):
    s = settings("redis", redis_server.url, tpm=120)  # 0.5 s of TAT per token
    adm = QuotaAdmission(s, QuotaMetrics())
    r = redis_server.client()
    key = s.key_prefix + "p:key:alice:t"
    try:
        prime = request(max_tokens=40)
        t = await adm.admit(prime)  # TAT now ~ 22 s ahead: stays ahead of the clock below
        prime.prompt_tokens, prime.completion_tokens, prime.first_token_at = 4, 40, 1.0
        await t.settle(prime)
        before = int(r.get(key))
        ctx = request(max_tokens=30)  # reserves ceil(12/4) + 30 = 33
        t = await adm.admit(ctx)
        assert int(r.get(key)) - before == pytest.approx(33 * PERIOD / 120 * 1e6, abs=2)
        assert dict(ctx.response_headers)[b"x-ratelimit-limit-tokens"] == b"120"
        ctx.prompt_tokens, ctx.completion_tokens, ctx.first_token_at = 5, 7, 1.0
        await t.settle(ctx)
        assert int(r.get(key)) - before == pytest.approx(12 * PERIOD / 120 * 1e6, abs=2)
        # A failure before any token: the whole reservation comes back.
        ctx = request(max_tokens=10)
        t = await adm.admit(ctx)
        ctx.status = 502
        await t.settle(ctx)
        assert int(r.get(key)) - before == pytest.approx(12 * PERIOD / 120 * 1e6, abs=2)
        # A reservation beyond what is left is refused before anything is generated.
        e = await try_admit(adm, request(max_tokens=100))
        assert isinstance(e, ApiError) and e.status == 429 and "tokens" in e.message
    finally:
        r.close()
        await adm.close()


async def test_concurrency_lease_expires_when_a_replica_dies(redis_server):
    s = settings("redis", redis_server.url, max_concurrent=1)
    s.concurrency_lease = 0.3
    adm = QuotaAdmission(s, QuotaMetrics())
    try:
        assert not isinstance(await try_admit(adm, request()), ApiError)  # never settled
        assert isinstance(await try_admit(adm, request()), ApiError)
        await asyncio.sleep(0.5)
        assert not isinstance(await try_admit(adm, request()), ApiError)
    finally:
        await adm.close()


def _metric(stats: QuotaMetrics, name: str, labels: dict[str, str]) -> float:
    """A count from admission's snapshot, by the name gateway/metrics/ exports it under."""
    snap = stats.snapshot()
    series = {
        "llm_gateway_quota_backend_errors_total": snap.backend_errors,
        "llm_gateway_quota_backend_up": snap.backend_up,
        "llm_gateway_quota_settle_errors_total": snap.settle_errors,
    }[name]
    return series.get(tuple(labels.values()), 0.0)


async def test_redis_down_fail_open_uses_local_limits(own_redis, caplog):
    s = settings("redis", own_redis.url, rpm=3)
    s.redis_retry_interval = 0.0
    reg = QuotaMetrics()
    adm = QuotaAdmission(s, reg)
    try:
        assert not isinstance(await try_admit(adm, request()), ApiError)
        own_redis.stop()
        with caplog.at_level(logging.ERROR, logger="gateway.quota"):
            results = [await try_admit(adm, request()) for _ in range(5)]
        # Local limits that start from the last shared state (1 of 3 used), not from a fresh bucket of 3.
        assert [isinstance(r, ApiError) for r in results] == [False, False, True, True, True]
        assert _metric(reg, "llm_gateway_quota_backend_errors_total", {"backend": "redis", "mode": "open"}) == 5
        assert _metric(reg, "llm_gateway_quota_backend_up", {"backend": "redis"}) == 0
        assert any("fail open" in r.getMessage() for r in caplog.records)
        # Tickets of the local limiter settle locally; nothing raises.
        own_redis.start()
        t = await adm.admit(request("bob"))
        assert _metric(reg, "llm_gateway_quota_backend_up", {"backend": "redis"}) == 1
        await t.settle(request("bob"))
        # Back on Redis: alice's shared budget (1 of 3 used before the outage; the restart lost it) applies.
        results = [await try_admit(adm, request()) for _ in range(4)]
        assert sum(not isinstance(r, ApiError) for r in results) == 3
    finally:
        await adm.close()


async def test_redis_down_fail_closed_answers_503(own_redis, caplog):
    s = settings("redis", own_redis.url, rpm=100, tpm=10_000)
    s.on_backend_error = "closed"
    reg = QuotaMetrics()
    adm = QuotaAdmission(s, reg)
    try:
        ticket = await adm.admit(request())
        own_redis.stop()
        with caplog.at_level(logging.ERROR, logger="gateway.quota"):
            e = await try_admit(adm, request())
            ctx = request()
            ctx.first_token_at, ctx.prompt_tokens, ctx.completion_tokens = 1.0, 1, 1
            await ticket.settle(ctx)  # settling against a dead Redis is logged and counted, never raised
        assert isinstance(e, ApiError) and e.status == 503 and e.code == "quota_backend_unavailable"
        assert int(e.headers["retry-after"]) >= 1
        assert _metric(reg, "llm_gateway_quota_backend_errors_total", {"backend": "redis", "mode": "closed"}) == 1
        assert _metric(reg, "llm_gateway_quota_settle_errors_total", {"backend": "redis"}) == 1
        assert any("fail closed" in r.getMessage() for r in caplog.records)
    finally:
        await adm.close()


async def test_settlement_missed_during_outage_is_replayed(own_redis):
    import signal

    s = settings("redis", own_redis.url, max_concurrent=1, tpm=60)  # 1 s of TAT per token
    s.redis_retry_interval = 0.0
    s.redis_timeout = 0.5
    reg = QuotaMetrics()
    adm = QuotaAdmission(s, reg)
    r = own_redis.client()
    try:
        ctx = request(max_tokens=50)
        ticket = await adm.admit(ctx)
        tat_reserved = int(r.get(s.key_prefix + "p:key:alice:t"))
        own_redis.proc.signal(signal.SIGSTOP)  # state survives, but nothing answers
        try:
            ctx.first_token_at, ctx.prompt_tokens, ctx.completion_tokens = 1.0, 3, 7
            await ticket.settle(ctx)
        finally:
            own_redis.proc.signal(signal.SIGCONT)
        assert _metric(reg, "llm_gateway_quota_settle_errors_total", {"backend": "redis"}) == 1
        # The slot is still held in Redis: the next request is refused, and Redis being back triggers the replay.
        e = await try_admit(adm, request())
        assert isinstance(e, ApiError) and e.status == 429
        assert adm._replay is not None
        await adm._replay
        # The token correction was replayed too: reserved 3 + 50, used 10, so 43 tokens (43 s of TAT) refunded.
        assert tat_reserved - int(r.get(s.key_prefix + "p:key:alice:t")) == pytest.approx(43 * 1e6, abs=2)
        assert not isinstance(await try_admit(adm, request()), ApiError)
    finally:
        r.close()
        await adm.close()
