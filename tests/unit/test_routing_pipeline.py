"""The routing pipeline as pure functions: filters, scorers, pickers, breaker, outlier ejection, retry
budget, affinity keys, the bounded-load ring and DNS-driven pool updates. No network."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from gateway.context import RequestContext
from gateway.routing.affinity import HashRing, affinity_key, bounded_load_pick, prompt_prefix
from gateway.routing.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, OutlierDetector
from gateway.routing.discovery import DnsDiscovery, DnsTarget, parse_upstreams
from gateway.routing.pipeline import (
    POLICIES,
    PickContext,
    RouteRequest,
    available,
    choose,
    kv_cache_aware_scores,
    least_outstanding,
    lowest,
    power_of_two,
)
from gateway.routing.pool import EndpointPool
from gateway.routing.retry import RetryBudget
from gateway.routing.router import Router
from gateway.settings import RoutingSettings

SYSTEM = "You are a careful assistant. " * 60  # ~1700 chars


def pool_of(n: int, **kw) -> EndpointPool:
    return EndpointPool.from_urls("m", [f"http://10.0.0.{i}:8000" for i in range(n)], RoutingSettings(**kw))


def chat(system: str, user: str) -> dict:
    return {
        "model": "m",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }


# -- filters and pickers ------------------------------------------------------------------------------------


def test_available_drops_unhealthy_open_ejected_and_tried():
    p = pool_of(5)
    a, b, c, d, e = p.endpoints
    b.healthy = False
    for _ in range(5):
        c.breaker.record_failure(100.0)
    d.outlier.eject(100.0)
    got = available(p.endpoints, 100.0, {e.url})
    assert got == [a]


def test_least_outstanding_counts_gateway_in_flight_and_engine_queue():
    p = pool_of(3)
    a, b, c = p.endpoints
    a.in_flight, b.in_flight, c.in_flight = 2, 0, 1
    b.engine_waiting = 5
    assert least_outstanding(p.endpoints) is c


def test_least_outstanding_breaks_ties_at_random():
    p = pool_of(3)
    rng = random.Random(1)
    seen = Counter(least_outstanding(p.endpoints, rng).url for _ in range(300))
    assert len(seen) == 3 and min(seen.values()) > 50


def test_choose_returns_none_when_nothing_is_available():
    p = pool_of(2)
    for e in p.endpoints:
        e.healthy = False
    for policy in POLICIES.values():
        assert choose(p.endpoints, RouteRequest(), 0.0, policy, PickContext(random.Random(0))) is None


# -- policies ----------------------------------------------------------------------------------------------


def test_every_policy_in_the_settings_is_registered_and_only_prefix_affinity_hashes_prompts():
    names = set(RoutingSettings.model_fields["policy"].annotation.__args__)
    assert names == set(POLICIES)
    assert {n for n, p in POLICIES.items() if p.prefix_keys} == {"prefix_affinity"}


def test_a_removed_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="routing.policy"):
        RoutingSettings(prefix_affinity=False)
    with pytest.raises(ValueError):
        RoutingSettings(policy="round_robin")


def test_power_of_two_takes_the_less_loaded_of_the_two_drawn():
    p = pool_of(4)
    loads = [5, 0, 9, 2]
    for e, n in zip(p.endpoints, loads, strict=True):
        e.in_flight = n
    rng = random.Random(3)
    for _ in range(200):
        state = rng.getstate()
        i, j = rng.sample(range(4), 2)
        rng.setstate(state)
        got = power_of_two(p.endpoints, rng)
        assert got.load == min(loads[i], loads[j])


def test_power_of_two_never_picks_the_most_loaded_and_spreads_over_the_rest():
    p = pool_of(3)
    for e, n in zip(p.endpoints, [0, 1, 10], strict=True):
        e.in_flight = n
    seen = Counter(power_of_two(p.endpoints, random.Random(i)).url for i in range(300))
    assert p.endpoints[2].url not in seen
    # The idlest wins every draw it is in (2 of 3 pairs); the middle one the remaining pair.
    assert seen[p.endpoints[0].url] > seen[p.endpoints[1].url] > 50


def test_power_of_two_with_one_or_no_candidate():
    p = pool_of(1)
    assert power_of_two(p.endpoints, random.Random(0)) is p.endpoints[0]
    assert power_of_two([], random.Random(0)) is None


def test_kv_cache_aware_prefers_free_kv_cache_between_equally_loaded_replicas():
    p = pool_of(3)
    a, b, c = p.endpoints
    for e in p.endpoints:
        e.in_flight = 2
    a.kv_cache_usage, b.kv_cache_usage, c.kv_cache_usage = 0.9, 0.2, 0.5
    policy = POLICIES["kv_cache_aware"]
    assert choose(p.endpoints, RouteRequest(), 0.0, policy, PickContext(random.Random(0))) is b


def test_kv_cache_aware_weighs_load_against_kv_cache_use():
    p = pool_of(2)
    idle_full, busy_empty = p.endpoints
    idle_full.kv_cache_usage, busy_empty.kv_cache_usage = 0.8, 0.0
    busy_empty.in_flight = 4
    # Load normalised to 0..1: the busy one scores 1.0, the idle one 0.8 x weight.
    assert kv_cache_aware_scores(p.endpoints, 1.0) == [0.8, 1.0]
    policy = POLICIES["kv_cache_aware"]
    assert choose(p.endpoints, RouteRequest(), 0.0, policy, PickContext(random.Random(0), 1.0)) is idle_full
    assert choose(p.endpoints, RouteRequest(), 0.0, policy, PickContext(random.Random(0), 2.0)) is busy_empty
    # With weight 0 it is least outstanding; out-of-range readings are clamped to 0..1.
    busy_empty.kv_cache_usage = 7.0
    assert kv_cache_aware_scores(p.endpoints, 0.0) == [0.0, 1.0]
    assert kv_cache_aware_scores(p.endpoints, 1.0) == [0.8, 2.0]


def test_lowest_breaks_ties_at_random_and_keeps_a_unique_best():
    p = pool_of(3)
    assert lowest(p.endpoints, [2.0, 1.0, 3.0]) is p.endpoints[1]
    seen = Counter(lowest(p.endpoints, [1.0, 1.0, 3.0], random.Random(i)).url for i in range(100))
    assert set(seen) == {p.endpoints[0].url, p.endpoints[1].url}


def test_an_affinity_key_goes_to_the_ring_under_every_policy():
    p = pool_of(4)
    key = affinity_key(None, 1024, "session-1")
    home = next(p.ring.walk(key))
    for policy in POLICIES.values():
        got = choose(p.endpoints, RouteRequest(key=key), 0.0, policy, PickContext(random.Random(0)), p.ring)
        assert got.url == home, policy.name


def test_router_policy_from_settings():
    p = pool_of(2)
    a, b = p.endpoints
    a.in_flight = 3
    a.kv_cache_usage, b.kv_cache_usage = 0.0, 1.0
    ctx = RequestContext("r", "/v1/chat/completions")
    ctx.body = chat(SYSTEM, "q")
    # kv_cache_aware with a heavy KV weight prefers the busy replica with free KV cache; prefix keys are off.
    r = Router(RoutingSettings(policy="kv_cache_aware", kv_cache_weight=5.0), rng=random.Random(0))
    assert r.key_for(ctx) is None
    assert r.pick(p, ctx) is a
    # prefix_affinity hashes the long system prompt.
    assert Router(RoutingSettings(policy="prefix_affinity")).key_for(ctx) is not None


# -- affinity ----------------------------------------------------------------------------------------------


def test_prefix_key_shared_by_requests_with_the_same_long_system_prompt():
    k1 = affinity_key(chat(SYSTEM, "first question"), 1024)
    k2 = affinity_key(chat(SYSTEM, "a different question"), 1024)
    k3 = affinity_key(chat(SYSTEM.replace("careful", "cheerful"), "first question"), 1024)
    assert k1 is not None and k1 == k2 and k3 != k1


def test_short_prompts_get_no_key_and_session_id_wins():
    assert affinity_key(chat("short", "hi"), 1024) is None
    assert prompt_prefix({"prompt": "x" * 100}, 1024) is None
    assert affinity_key(chat("short", "hi"), 1024, session="s1") == affinity_key(
        chat(SYSTEM, "x"), 1024, session="s1"
    )
    assert affinity_key({"prompt": "y" * 2000}, 1024) == affinity_key({"prompt": "y" * 1024 + "z" * 50}, 1024)


def test_ring_spreads_keys_and_moves_only_a_removed_replicas_share():
    urls = [f"http://r{i}" for i in range(4)]
    ring4 = HashRing(urls, 64)
    ring3 = HashRing(urls[:3], 64)
    keys = [affinity_key({"prompt": f"{i}-" + "p" * 1100}, 1024) for i in range(2000)]
    first4 = [next(ring4.walk(k)) for k in keys]
    share = Counter(first4)
    assert len(share) == 4 and min(share.values()) > 250
    moved = sum(
        1 for k, u in zip(keys, first4, strict=False) if u != "http://r3" and next(ring3.walk(k)) != u
    )
    assert moved == 0


def test_bounded_load_keeps_a_cold_prefix_home_and_spills_a_hot_one():
    p = pool_of(2)
    ring = p.ring
    key = affinity_key(chat(SYSTEM, "q"), 1024)
    home_url = next(ring.walk(key))
    home = next(e for e in p.endpoints if e.url == home_url)
    other = next(e for e in p.endpoints if e.url != home_url)
    picks = []
    for _ in range(8):  # eight concurrent requests of one hot prefix
        ep = bounded_load_pick(ring, key, p.endpoints, 1.25)
        ep.in_flight += 1
        picks.append(ep)
    assert picks[0] is home and picks[1] is home
    assert 0 < picks.count(other) < picks.count(home)
    assert home.in_flight <= -(-1.25 * 8 // 2)


def test_router_sends_one_prefix_to_one_replica_when_idle():
    p = pool_of(3)
    r = Router(RoutingSettings(), rng=random.Random(0))
    urls = set()
    for i in range(10):
        ctx = RequestContext(f"r{i}", "/v1/chat/completions")
        ctx.body = chat(SYSTEM, f"question {i}")
        urls.add(r.pick(p, ctx).url)
    assert len(urls) == 1


def test_router_without_affinity_spreads_by_load():
    p = pool_of(2)
    r = Router(RoutingSettings(policy="least_outstanding"), rng=random.Random(0))
    for i in range(6):
        ctx = RequestContext(f"r{i}", "/v1/chat/completions")
        ctx.body = chat(SYSTEM, f"question {i}")
        r.pick(p, ctx).in_flight += 1
    assert sorted(e.in_flight for e in p.endpoints) == [3, 3]


# -- breaker and outliers -------------------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_faults_only():
    b = CircuitBreaker(failures=3, open_seconds=5, max_open=60)
    b.record_failure(0)
    b.record_failure(0)
    b.record_success()
    b.record_failure(0)
    b.record_failure(0)
    assert b.state == CLOSED and b.allows(0)
    assert b.record_failure(0) is True
    assert b.state == OPEN and not b.allows(4.9)


def test_breaker_half_open_lets_one_trial_through_then_closes_or_reopens_longer():
    b = CircuitBreaker(failures=1, open_seconds=5, max_open=60)
    b.record_failure(0)
    assert b.allows(5.0)
    b.acquire(5.0)
    assert b.state == HALF_OPEN and not b.allows(5.0)  # the single trial is in flight
    b.record_failure(6.0)
    assert b.state == OPEN and b.open_until == 16.0  # twice as long
    b.acquire(16.0)
    b.record_success()
    assert b.state == CLOSED and b.allows(16.0) and b.open_for == 5


def test_breaker_trial_slot_is_freed_when_the_client_leaves():
    b = CircuitBreaker(failures=1, open_seconds=1)
    b.record_failure(0)
    b.acquire(2)
    assert not b.allows(2)
    b.release()
    assert b.allows(2)


def test_outlier_detector_ejects_on_fault_ratio():
    o = OutlierDetector(window=10, min_requests=6, ratio=0.5, eject=10)
    for fault in (True, False, True, False, True):
        o.record(fault)
    assert not o.should_eject(0)  # too few samples
    o.record(False)
    assert o.should_eject(0)
    o.eject(0)
    assert o.ejected(9.9) and not o.ejected(10.0)
    o.eject(20)
    assert o.ejected_until == 40  # grows with each ejection


def test_router_never_ejects_more_than_the_allowed_share():
    p = pool_of(2, outlier_window=4, outlier_min_requests=4, outlier_ratio=0.5, breaker_failures=100)
    r = Router(p.settings)
    ctx = RequestContext("x", "/v1/completions")
    for e in p.endpoints:
        for _ in range(4):
            r.on_failure(p, e, ctx, "5xx")
    assert sum(e.outlier.ejections for e in p.endpoints) == 1
    assert sum(1 for e in p.endpoints if e.available(__import__("time").monotonic())) == 1


def test_client_errors_are_successes_for_the_breaker():
    p = pool_of(1, breaker_failures=2)
    r = Router(p.settings)
    ep = p.endpoints[0]
    ctx = RequestContext("x", "/v1/completions")
    for _ in range(100):  # the proxy reports a relayed 4xx as on_success
        r.on_success(p, ep, ctx)
    assert ep.breaker.state == CLOSED and ep.breaker.opened_count == 0


# -- retry budget ---------------------------------------------------------------------------------------------


def test_retry_budget_floor_then_ratio_then_window():
    b = RetryBudget(ratio=0.2, window=10, min_retries=2)
    assert b.try_retry(0) and b.try_retry(0) and not b.try_retry(0)
    for _ in range(20):
        b.record_request(1)
    assert b.try_retry(1) and b.try_retry(1)  # 4 <= 0.2 * 20
    assert not b.try_retry(1)
    assert b.try_retry(12)  # the old second fell out of the window
    assert b.counts == (0, 1)


def test_router_retry_respects_max_retries():
    p = pool_of(3)
    r = Router(RoutingSettings(retry_min=100), max_retries=1)
    ctx = RequestContext("x", "/v1/completions")
    ctx.attempts = 1
    assert r.may_retry(p, ctx)
    ctx.attempts = 2
    assert not r.may_retry(p, ctx)


# -- discovery -----------------------------------------------------------------------------------------------


def test_parse_upstreams_keeps_the_dns_syntax():
    static, dns = parse_upstreams(
        ["http://a:8000/", "dns+http://my-engine-headless.ns.svc.cluster.local:8000"]
    )
    assert static == ["http://a:8000"]
    assert dns == [DnsTarget("http", "my-engine-headless.ns.svc.cluster.local", 8000)]
    assert dns[0].url_for("10.1.2.3") == "http://10.1.2.3:8000"
    assert dns[0].url_for("fd00::7") == "http://[fd00::7]:8000"
    with pytest.raises(ValueError):
        parse_upstreams(["dns+ftp://x:1"])


def test_dns_discovery_adds_and_removes_replicas_and_survives_lookup_failures():
    pool = EndpointPool.from_urls("m", ["http://static:1"], RoutingSettings())
    answers: list = [["10.0.0.1", "10.0.0.2"], ["10.0.0.2", "10.0.0.3"], OSError("SERVFAIL")]
    probed: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    async def on_added(ep) -> None:
        probed.append(ep.url)
        ep.healthy = True

    d = DnsDiscovery(
        {"m": (pool, ["http://static:1"], [DnsTarget("http", "svc", 8000)])}, 5, resolver, on_added
    )

    async def go():
        await d.refresh()
        kept = pool.endpoints[2]
        kept.in_flight = 3
        await d.refresh()
        assert [e.url for e in pool.endpoints] == [
            "http://static:1",
            "http://10.0.0.2:8000",
            "http://10.0.0.3:8000",
        ]
        assert pool.endpoints[1] is kept and kept.in_flight == 3  # state of a staying replica is kept
        await d.refresh()  # lookup fails: keep the last known set
        assert [e.url for e in pool.endpoints][1:] == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]

    asyncio.run(go())
    assert probed == ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]


def test_engine_reported_running_counts_when_it_exceeds_the_gateways_own():
    p = pool_of(2)
    a, b = p.endpoints
    a.in_flight = 1
    b.engine_running = 4  # another gateway keeps b busy
    assert least_outstanding(p.endpoints) is a
    b.engine_running = 0
    assert least_outstanding(p.endpoints) is b
