"""GCRA arithmetic of the in-process limiter on a controlled clock, bucket resolution, reservation, headers."""

from __future__ import annotations

import pytest

from gateway.auth.principal import Principal
from gateway.context import RequestContext
from gateway.quota.admission import QuotaAdmission
from gateway.quota.config import QuotaSettings
from gateway.quota.limits import Bucket, LimitTable, format_reset, parse_reset, rate_limit_headers
from gateway.quota.memory import MemoryLimiter
from gateway.quota.metrics import QuotaMetrics


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_smooth_refill_not_fixed_window():
    clock = Clock()
    lim = MemoryLimiter(clock)
    b = (Bucket("p:a", rpm=6),)
    assert [lim.acquire(b, 0, "").allowed for _ in range(8)] == [True] * 6 + [False] * 2
    d = lim.acquire(b, 0, "")
    assert d.reason == "requests" and d.retry_after == pytest.approx(10.0)
    # One request per 10 s comes back: no double burst at a window edge.
    clock.t += 9.9
    assert not lim.acquire(b, 0, "").allowed
    clock.t += 0.1
    assert lim.acquire(b, 0, "").allowed
    assert not lim.acquire(b, 0, "").allowed
    clock.t += 60
    assert [lim.acquire(b, 0, "").allowed for _ in range(7)] == [True] * 6 + [False]


def test_odd_limits_are_exact_despite_float_intervals():
    for rpm in (7, 13, 997):
        lim = MemoryLimiter(Clock())
        b = (Bucket("p:x", rpm=rpm),)
        allowed = sum(lim.acquire(b, 0, "").allowed for _ in range(rpm + 5))
        assert allowed == rpm


def test_tokens_reserve_and_settle_refund_and_overdraft():
    clock = Clock()
    lim = MemoryLimiter(clock)
    b = (Bucket("p:a", tpm=600),)  # 0.1 s per token
    d = lim.acquire(b, 500, "")
    assert d.allowed and d.states[0].tok_remaining == 100
    assert not lim.acquire(b, 200, "").allowed  # would exceed by its reservation
    lim.release(b, "", -300)  # real usage was 200
    assert lim.tat("p:a:t") == pytest.approx(clock.t + 20.0)
    d = lim.acquire(b, 200, "")
    assert d.allowed and d.states[0].tok_remaining == 200
    lim.release(b, "", 50)  # used 50 more than reserved
    assert lim.tat("p:a:t") == pytest.approx(clock.t + 45.0)
    # A refund on a bucket that refilled meanwhile cannot push it above full.
    clock.t += 100
    lim.release(b, "", -100)
    assert lim.acquire(b, 600, "").allowed
    assert not lim.acquire(b, 1, "").allowed


def test_concurrency_slots_are_released_by_settle():
    lim = MemoryLimiter(Clock())
    b = (Bucket("p:a", concurrency=2),)
    assert lim.acquire(b, 0, "l1").allowed and lim.acquire(b, 0, "l2").allowed
    d = lim.acquire(b, 0, "l3")
    assert not d.allowed and d.reason == "concurrency"
    lim.release(b, "l1", 0)
    assert lim.acquire(b, 0, "l3").allowed
    assert lim.in_flight("p:a") == 2


def test_all_or_nothing_across_buckets():
    lim = MemoryLimiter(Clock())
    principal = Bucket("p:a", rpm=100)
    tenant = Bucket("t:x", rpm=2)
    both = (principal, tenant)
    assert lim.acquire(both, 0, "").allowed and lim.acquire(both, 0, "").allowed
    d = lim.acquire(both, 0, "")
    assert not d.allowed
    # The refused request did not consume the principal's own budget.
    assert d.states[0].req_remaining == 98


def test_bucket_resolution():
    s = QuotaSettings.model_validate({
        "default": {"rpm": 5},
        "principals": {"bot": {"rpm": 10, "tpm": 1000, "models": {"big": {"rpm": 1}}}},
        "tenants": {"team": {"max_concurrent": 3, "models": {"big": {"tpm": 50}}}},
    })
    t = LimitTable(s)
    someone = Principal("someone", "other", "api_key", "k1")
    assert t.buckets(someone.id, someone.quota_names, "other", "big") == (Bucket("p:key:someone", rpm=5),)
    by_key_id = Principal("subj", "team", "api_key", "bot")
    got = t.buckets(by_key_id.id, by_key_id.quota_names, "team", "big")
    assert got == (
        Bucket("p:key:subj", rpm=10, tpm=1000),
        Bucket("p:key:subj:m:big", rpm=1),
        Bucket("t:team", concurrency=3),
        Bucket("t:team:m:big", tpm=50),
    )
    by_subject = Principal("bot", "team", "api_key", "k9")
    assert t.buckets(by_subject.id, by_subject.quota_names, "team", "small") == (
        Bucket("p:key:bot", rpm=10, tpm=1000),
        Bucket("t:team", concurrency=3),
    )
    # A token whose subject is "bot" is someone else: the default limits, its own bucket.
    jwt = Principal("bot", "team", "jwt", "https://idp.example")
    assert t.buckets(jwt.id, jwt.quota_names, "team", "small") == (
        Bucket("p:jwt:https://idp.example#bot", rpm=5),
        Bucket("t:team", concurrency=3),
    )
    assert QuotaSettings().active is False
    assert s.active


def test_reservation_uses_prompt_estimate_max_tokens_default_and_n():
    s = QuotaSettings.model_validate({"default": {"tpm": 10_000}, "default_max_tokens": 100})
    adm = QuotaAdmission(s, QuotaMetrics())
    ctx = RequestContext("r", "/v1/chat/completions")
    ctx.prompt_chars = 40
    ctx.body = {"messages": [{"role": "user", "content": "x" * 40}]}
    assert adm.reservation(ctx) == 10 + 4 + 100
    ctx.max_tokens = 7
    ctx.body["n"] = 3
    assert adm.reservation(ctx) == 14 + 21
    e = RequestContext("r", "/v1/embeddings")
    e.prompt_chars = 9
    e.body = {"input": "x" * 9}
    assert adm.reservation(e) == 3


async def test_admission_refuses_with_headers_and_retry_after():
    s = QuotaSettings.model_validate({"default": {"rpm": 2, "tpm": 1000}, "default_max_tokens": 10})
    adm = QuotaAdmission(s, QuotaMetrics())
    from gateway.errors import ApiError

    def ctx() -> RequestContext:
        c = RequestContext("r", "/v1/completions")
        c.principal = Principal("alice")
        c.model = "m"
        c.body = {"prompt": "abcd"}
        c.prompt_chars = 4
        return c

    c1 = ctx()
    t = await adm.admit(c1)
    h = dict(c1.response_headers)
    assert h[b"x-ratelimit-limit-requests"] == b"2" and h[b"x-ratelimit-remaining-requests"] == b"1"
    assert h[b"x-ratelimit-limit-tokens"] == b"1000" and h[b"x-ratelimit-remaining-tokens"] == b"989"
    assert 29 < parse_reset(h[b"x-ratelimit-reset-requests"].decode()) <= 30
    c1.prompt_tokens, c1.completion_tokens = 3, 2
    c1.first_token_at = 1.0
    await t.settle(c1)
    assert c1.extra["quota_settled_tokens"] == 5
    await adm.admit(ctx())
    c3 = ctx()
    with pytest.raises(ApiError) as ei:
        await adm.admit(c3)
    e = ei.value
    assert e.status == 429 and e.code == "rate_limit_exceeded"
    assert 1 <= int(e.headers["retry-after"]) <= 30
    h = dict(c3.response_headers)
    assert h[b"x-ratelimit-remaining-requests"] == b"0"
    # Too large for the TPM limit at all: refused by the reservation alone.
    big = ctx()
    big.max_tokens = 5000
    with pytest.raises(ApiError) as ei:
        await adm.admit(big)
    assert ei.value.status == 429 and "Request too large" in ei.value.message


def test_reset_format_round_trip():
    assert format_reset(0.02) == "20ms"
    assert format_reset(1.5) == "1.5s"
    assert format_reset(360) == "6m0s"
    assert format_reset(3723) == "1h2m3s"
    for v in (0.02, 1.5, 59.999, 360, 3723.25):
        assert parse_reset(format_reset(v)) == pytest.approx(v, abs=0.001)


def test_headers_pick_the_most_constrained_bucket():
    from gateway.quota.limits import BucketState

    bs = (Bucket("p", rpm=100, tpm=50), Bucket("t", rpm=10))
    st = [BucketState(90, 6.0, 40, 12.0), BucketState(3, 42.0, -1, 0.0)]
    h = dict(rate_limit_headers(bs, st))
    assert h[b"x-ratelimit-limit-requests"] == b"10" and h[b"x-ratelimit-remaining-requests"] == b"3"
    assert h[b"x-ratelimit-reset-requests"] == b"42s"
    assert h[b"x-ratelimit-limit-tokens"] == b"50" and h[b"x-ratelimit-remaining-tokens"] == b"40"


@pytest.mark.parametrize("seed", range(6))
def test_one_bucket_fast_path_decides_like_the_general_path(seed):
    """A principal's single bucket takes a shorter path through the limiter: every decision, state and
    stored TAT must be what the general (several buckets) path gives, refusals and releases included."""
    import random

    rng = random.Random(seed)
    bucket = Bucket(
        "p:x",
        rpm=rng.choice([0, 3, 50]),
        tpm=rng.choice([0, 200, 5000]),
        concurrency=rng.choice([0, 1, 3]),
    )
    clock = Clock()
    fast, general = MemoryLimiter(clock), MemoryLimiter(clock)
    held: list[str] = []
    for i in range(300):
        clock.t += rng.choice([0.0, 0.05, 0.5, 3.0])
        if held and rng.random() < 0.4:
            lease = held.pop(rng.randrange(len(held)))
            delta = rng.randint(-50, 50)
            fast.release((bucket,), lease, delta)
            general.release((bucket,), lease, delta)
            continue
        cost, lease = rng.randint(0, 400), f"l{i}"
        a = fast.acquire((bucket,), cost, lease)
        b = general._acquire_many((bucket,), cost, lease)
        assert (a.allowed, a.reason) == (b.allowed, b.reason)
        assert a.retry_after == pytest.approx(b.retry_after)
        assert a.states == b.states
        assert fast.tat("p:x:r") == general.tat("p:x:r") and fast.tat("p:x:t") == general.tat("p:x:t")
        assert fast.in_flight("p:x") == general.in_flight("p:x")
        if a.allowed:
            held.append(lease)
