"""The fair queue as pure logic (ordering, weights, classes, no starvation, prediction) and the admission
step over an in-memory pool (class resolution, shedding, slot release on every exit), the budget per replica
(the router's cap) and per gateway worker. No network."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from gateway.auth.principal import Principal
from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.fairqueue.admission import FairQueueStep, worker_share
from gateway.fairqueue.config import FairQueueSettings
from gateway.fairqueue.scheduler import FairQueue, Waiter
from gateway.routing.pipeline import under_cap
from gateway.routing.pool import EndpointPool
from gateway.routing.router import Router
from gateway.settings import RoutingSettings

CLASSES = {"interactive": (0, 0), "batch": (1, 0)}


def fq(capacity: int, weights: dict[str, float] | None = None, classes=CLASSES) -> FairQueue:
    w = weights or {}
    q = FairQueue(dict(classes), lambda t, p: (w.get(t, 1.0), w.get(p, 1.0)))
    q.set_capacity(capacity)
    return q


def wt(
    tenant: str, cls: str = "interactive", principal: str | None = None, cost: float = 1.0, t: float = 0.0
) -> Waiter:
    return Waiter(tenant, principal or tenant + "-key", cls, cost, t)


def serve_one(q: FairQueue, held: list[Waiter], now: float) -> Waiter | None:
    """Release the oldest held slot; return the waiter it let in (and hold it)."""
    got = q.release(held.pop(0), now)
    assert len(got) <= 1
    held.extend(got)
    return got[0] if got else None


# -- ordering -----------------------------------------------------------------------------------------------


def test_free_slots_are_granted_at_once_then_requests_queue():
    q = fq(2)
    a, b, c = wt("a"), wt("a"), wt("a")
    assert q.request(a, 0) and q.request(b, 0)
    assert not q.request(c, 0)
    assert (q.in_use, q.queued) == (2, 1)
    assert q.release(a, 1) == [c]
    assert c.granted and (q.in_use, q.queued) == (2, 0)


def test_light_tenant_waits_for_one_slot_not_behind_the_heavy_backlog():
    q = fq(4)
    held = [wt("heavy") for _ in range(4)]
    for w in held:
        assert q.request(w, 0)
    backlog = [wt("heavy") for _ in range(200)]
    for w in backlog:
        assert not q.request(w, 0)
    light = wt("light")
    assert not q.request(light, 1)
    assert serve_one(q, held, 2) is light
    # ... and the heavy tenant's backlog then continues in order.
    assert serve_one(q, held, 3) is backlog[0]


def test_weights_share_slots_in_proportion():
    q = fq(1, {"a": 3.0, "b": 1.0})
    held = [wt("x")]
    q.request(held[0], 0)
    for _ in range(400):
        q.request(wt("a"), 0)
        q.request(wt("b"), 0)
    served = Counter(serve_one(q, held, i).tenant for i in range(400))
    assert served["a"] + served["b"] == 400
    assert abs(served["a"] / served["b"] - 3.0) < 0.1


def test_cost_counts_as_service():
    # Tenant a's requests are 4x as large: with equal weights b gets ~4x as many grants.
    q = fq(1)
    held = [wt("x")]
    q.request(held[0], 0)
    for _ in range(300):
        q.request(wt("a", cost=4.0), 0)
        q.request(wt("b", cost=1.0), 0)
    served = Counter(serve_one(q, held, i).tenant for i in range(250))
    assert abs(served["b"] / served["a"] - 4.0) < 0.25


def test_principals_share_their_tenants_slots_fairly():
    q = fq(1)
    held = [wt("x")]
    q.request(held[0], 0)
    for _ in range(50):
        q.request(wt("t", principal="p1"), 0)
    for _ in range(50):
        q.request(wt("t", principal="p2"), 0)
    order = [serve_one(q, held, i).principal for i in range(20)]
    assert Counter(order) == {"p1": 10, "p2": 10}


def test_interactive_goes_before_batch():
    q = fq(1)
    held = [wt("x", "batch")]
    q.request(held[0], 0)
    batch = [wt("b", "batch") for _ in range(5)]
    for w in batch:
        q.request(w, 0)
    inter = wt("i", "interactive")
    q.request(inter, 1)
    assert serve_one(q, held, 2) is inter
    assert serve_one(q, held, 3) is batch[0]


def test_extra_slots_only_for_their_class():
    q = fq(2, classes={"interactive": (0, 0), "batch": (1, 0)})
    q.set_capacity(2, {"interactive": 1})
    assert q.request(wt("b", "batch"), 0) and q.request(wt("b", "batch"), 0)
    assert not q.request(wt("b", "batch"), 0)  # shared capacity is full
    assert q.request(wt("i", "interactive"), 0)  # the interactive headroom
    assert not q.request(wt("i", "interactive"), 0)
    assert q.in_use == 3


def test_capacity_growth_lets_waiters_in():
    q = fq(0)
    ws = [wt("a") for _ in range(3)]
    for w in ws:
        assert not q.request(w, 0)
    assert q.set_capacity(2) == ws[:2]


# -- fairness over time: no starvation, no banked credit -------------------------------------------------------


def test_no_starvation_of_a_low_weight_tenant():
    q = fq(2, {"big": 100.0, "mid": 10.0, "small": 1.0})
    held = [wt("x"), wt("x")]
    for w in held:
        q.request(w, 0)
    for name in ("big", "mid", "small"):
        for _ in range(2000):
            q.request(wt(name), 0)
    served = Counter(serve_one(q, held, i).tenant for i in range(1110))
    # Every tenant is served, in proportion to its weight (1110 grants: 1000/100/10).
    assert served["small"] >= 8 and served["mid"] >= 90 and served["big"] >= 990


def test_an_idle_tenant_banks_no_credit():
    q = fq(1)
    held = [wt("x")]
    q.request(held[0], 0)
    # Tenant a alone is served 100 times.
    for _ in range(100):
        q.request(wt("a"), 0)
    for i in range(100):
        serve_one(q, held, i)
    # Now b, idle so far, arrives with a backlog: it does not get 100 grants in a row before a's next one.
    for _ in range(100):
        q.request(wt("a"), 0)
        q.request(wt("b"), 0)
    first = [serve_one(q, held, 100 + i).tenant for i in range(20)]
    assert Counter(first)["a"] >= 9


def test_a_tenant_that_used_free_slots_yields_to_one_that_did_not():
    q = fq(10)
    held = [wt("heavy") for _ in range(10)]
    for w in held:
        assert q.request(w, 0)  # immediate grants are charged too
    q.request(wt("heavy"), 0)
    light = wt("light")
    q.request(light, 0)
    assert serve_one(q, held, 1) is light


# -- cancel / release -----------------------------------------------------------------------------------------


def test_cancel_while_queued_and_after_grant():
    q = fq(1)
    a, b, c = wt("a"), wt("b"), wt("c")
    q.request(a, 0)
    q.request(b, 0)
    q.request(c, 0)
    assert q.cancel(b, 1) == [] and q.queued == 1
    # c was granted by a's release; cancelling a granted waiter releases its slot (exactly once).
    assert q.release(a, 2) == [c]
    assert q.cancel(c, 3) == [] and q.in_use == 0
    assert q.release(c, 4) == [] and q.in_use == 0
    assert q.released_total == 2


def test_unlimited_grants_hold_no_slot():
    q = fq(0)
    w = wt("a")
    q.grant_unlimited(w, 0)
    assert w.granted and q.in_use == 0
    assert q.release(w, 1) == [] and q.in_use == 0


def test_prune_keeps_bookkeeping_bounded():
    q = fq(1000)
    held = [wt(f"t{i}") for i in range(500)]
    for w in held:
        assert q.request(w, 0)
    for w in held:
        q.release(w, 1)
    assert sum(len(c.tenants) for c in q._order) == 500  # each used a slot: its clock is ahead
    q.prune(keep=100)
    assert sum(len(c.tenants) for c in q._order) == 0
    # A tenant with requests waiting is never forgotten.
    q.set_capacity(0)
    w = wt("waiting")
    q.request(w, 2)
    q.prune(keep=0)
    assert q.set_capacity(1) == [w]


# -- prediction -----------------------------------------------------------------------------------------------


def test_predicted_wait_from_measured_hold_time():
    q = fq(2)
    a, b = wt("a"), wt("a")
    q.request(a, 0)
    q.request(b, 0)
    assert q.predict_wait("c", "c-key", "interactive", 1) is None  # nothing measured yet
    q.release(a, 10.0)  # held 10 s
    assert q.mean_hold == pytest.approx(10.0)
    assert q.predict_wait("c", "c-key", "interactive", 1) == 0.0  # a slot is free
    q.request(wt("a"), 10)
    for _ in range(6):
        q.request(wt("a"), 10)
    # 6 of a's requests queued; a new request of a waits for 7 slots at 2 per 10 s.
    assert q.predict_wait("a", "a-key", "interactive", 1) == pytest.approx(35.0)
    # A new tenant is served after about one of a's queued requests, not after all six.
    assert q.predict_wait("c", "c-key", "interactive", 1) <= 10.0
    # Batch waits behind everything interactive.
    assert q.predict_wait("c", "c-key", "batch", 1) == pytest.approx(35.0)


# -- the admission step ---------------------------------------------------------------------------------------


def principal(tenant: str = "t", key: str = "k", scopes: tuple[str, ...] = ()) -> Principal:
    return Principal(subject=key, tenant=tenant, key_id=key, scopes=frozenset(scopes))


def ctx_for(p: Principal, header: str | None = None, model: str = "m") -> RequestContext:
    ctx = RequestContext("r", "/v1/completions")
    ctx.principal = p
    ctx.model = model
    ctx.max_tokens = 16
    if header is not None:
        ctx.extra["request_headers"] = [(b"x-priority-class", header.encode())]
    return ctx


def step_for(**kw) -> FairQueueStep:
    pools = {"m": EndpointPool.from_urls("m", ["http://10.0.0.1:8000"])}
    return FairQueueStep(FairQueueSettings(enabled=True, **kw), pools, None)


def test_class_resolution_header_defaults_and_limits():
    s = step_for(
        tenants={"etl": {"classes": ["batch"]}},
        principals={"vip": {"default_class": "interactive"}},
        default={"default_class": "batch"},
        scope_classes={"llm-interactive": ["interactive"]},
    )
    assert s.resolve_class(principal(), None) == "batch"
    assert step_for().resolve_class(principal(), None) == "interactive"  # no configuration: the most urgent
    assert s.resolve_class(principal(), "interactive") == "interactive"
    assert s.resolve_class(principal(key="vip"), None) == "interactive"
    with pytest.raises(ApiError) as e:
        s.resolve_class(principal(tenant="etl"), "interactive")
    assert e.value.status == 403 and e.value.code == "priority_class_not_allowed"
    assert (
        s.resolve_class(principal(tenant="etl", scopes=("llm-interactive",)), "interactive") == "interactive"
    )
    with pytest.raises(ApiError) as e:
        s.resolve_class(principal(), "urgent")
    assert e.value.status == 400 and e.value.code == "invalid_priority_class"


def test_settings_reject_unknown_classes():
    with pytest.raises(ValueError, match="unknown class 'gold'"):
        FairQueueSettings(tenants={"a": {"classes": ["gold"]}})


def test_step_holds_releases_and_sheds():
    async def main() -> None:
        s = step_for(
            slots_per_replica=1,
            classes={"interactive": {"max_wait": 0.3}, "batch": {"rank": 1, "max_wait": 5}},
        )
        q = s.queues["m"]
        t1 = await s.admit(ctx_for(principal("a")))
        assert q.in_use == 1
        # A second request waits; it gets the slot when the first settles.
        c2 = ctx_for(principal("b"))
        waiting = asyncio.ensure_future(s.admit(c2))
        await asyncio.sleep(0.05)
        assert q.queued == 1
        await t1.settle(c2)
        t2 = await waiting
        assert q.in_use == 1 and q.queued == 0 and c2.extra["queue_wait"] >= 0
        # A third waits past its class's budget: 503 with Retry-After, and it leaves the queue.
        with pytest.raises(ApiError) as e:
            await s.admit(ctx_for(principal("c")))
        assert e.value.status == 503 and e.value.headers["retry-after"] == "1" and q.queued == 0
        # A fourth is cancelled while waiting (client gone): it leaves the queue, no slot leaks.
        w4 = asyncio.ensure_future(s.admit(ctx_for(principal("d"))))
        await asyncio.sleep(0.05)
        w4.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w4
        assert q.queued == 0
        await t2.settle(c2)
        await t2.settle(c2)  # settling twice releases once
        assert q.in_use == 0
        # Now hold times are measured (~0.05 s+): a long backlog predicts a wait past the budget -> shed at once.
        q.mean_hold = 1.0
        t5 = await s.admit(ctx_for(principal("a")))
        backlog = [asyncio.ensure_future(s.admit(ctx_for(principal("a"), "batch"))) for _ in range(5)]
        await asyncio.sleep(0.01)
        # Tenant a's own sixth batch request waits for its five, ~6 s at one slot per second: over 5 s.
        with pytest.raises(ApiError) as e:
            await s.admit(ctx_for(principal("a"), "batch"))
        assert e.value.status == 503 and int(e.value.headers["retry-after"]) == 6
        assert "predicted wait" in e.value.message
        for b in backlog:
            b.cancel()
        await asyncio.gather(*backlog, return_exceptions=True)
        await t5.settle(c2)
        assert (q.in_use, q.queued) == (0, 0)

    asyncio.run(main())


def test_cancel_after_grant_releases_the_slot():
    async def main() -> None:
        s = step_for(slots_per_replica=1)
        q = s.queues["m"]
        t1 = await s.admit(ctx_for(principal("a")))
        w = asyncio.ensure_future(s.admit(ctx_for(principal("b"))))
        await asyncio.sleep(0.01)
        # The slot is handed to w and, before w resumes, w is cancelled: the slot must come back.
        await t1.settle(ctx_for(principal("a")))
        w.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w
        assert (q.in_use, q.queued) == (0, 0)

    asyncio.run(main())


def test_adaptive_budget_follows_engine_metrics():
    import time

    s = step_for(adaptive={"initial": 8, "min": 2, "max": 16})
    ep = s.pools["m"].endpoints[0]
    ep.metrics_at = time.time()
    ep.engine_waiting, ep.engine_running = 4, 6  # the engine queues: shrink to what it runs
    s.tick()
    assert s.slots[ep.url] < 8 and s.queues["m"].capacity == s.slots[ep.url]
    n = s.slots[ep.url]
    ep.engine_waiting = 0
    ep.in_flight = n
    ep.kv_cache_usage = 0.3
    for _ in range(n + 1):
        s.queues["m"].request(wt("a"), 0)
    assert s.queues["m"].queued == 1  # someone waits and the engine has room: grow
    s.tick()
    assert s.slots[ep.url] > n


def test_headroom_lets_a_tenant_below_its_share_in_at_once():
    q = fq(4)
    q.set_capacity(4, headroom=2)
    heavy = [wt("heavy") for _ in range(6)]
    granted = [q.request(w, 0) for w in heavy]
    assert granted == [True] * 4 + [False] * 2  # the heavy tenant holds its share (all): no headroom
    # The light tenant's share is 4 x 1/2 = 2 slots: two requests go in at once, past the full budget.
    lights = [wt("light") for _ in range(3)]
    assert [q.request(w, 1) for w in lights] == [True, True, False]
    assert lights[0].under_share and q.in_use == 6
    # The headroom is paid back before anyone new gets a slot; then fair queuing as usual: the light tenant
    # already got two slots (charged), so its third comes after the heavy tenant's next ones, not after all.
    assert q.release(heavy[0], 2) == []  # 5 in use, budget 4: nobody new yet
    assert q.release(heavy[1], 2) == []
    got = q.release(heavy[2], 2) + q.release(heavy[3], 2) + q.release(lights[0], 3)
    assert got == [heavy[4], heavy[5], lights[2]]


def test_headroom_waiters_are_let_in_by_release():
    q = fq(2)
    q.set_capacity(2, headroom=1)
    a = [wt("a") for _ in range(3)]
    assert [q.request(w, 0) for w in a] == [True, True, False]
    b = wt("b")
    assert q.request(b, 0) and b.under_share  # b holds nothing: share 1
    b2 = wt("b")
    assert not q.request(b2, 0)  # b at its share now
    # b's headroom slot ends: b2 (b holds nothing again, share 1) takes the headroom, ahead of a's queue.
    assert q.release(b, 1) == [b2] and b2.under_share


# -- the budget per replica and per gateway worker -------------------------------------------------------------


def test_worker_share_splits_n_exactly():
    for n in (0, 1, 3, 64, 65, 127):
        for workers in (1, 2, 3, 4, 8):
            parts = [worker_share(n, workers, i) for i in range(workers)]
            assert max(parts) - min(parts) <= 1
            # The workers together hold exactly N (at least one slot each when N > 0).
            assert sum(parts) == (max(n, workers) if 0 < n < workers else n)
    assert worker_share(64, 1, 0) == 64
    assert [worker_share(10, 4, i) for i in range(4)] == [3, 3, 2, 2]


def test_workers_take_their_share_of_every_per_replica_number():
    urls = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    steps = []
    for i in range(3):
        pools = {"m": EndpointPool.from_urls("m", urls)}
        settings = FairQueueSettings(
            enabled=True,
            slots_per_replica=64,
            fair_share_headroom_per_replica=8,
            classes={"interactive": {"extra_slots_per_replica": 4}, "batch": {"rank": 1}},
        )
        steps.append(FairQueueStep(settings, pools, None, workers=3, worker_index=i))
    # Per replica, the three workers together hold N (64), H (8) and the class's extra slots (4).
    assert [s.slots_of(urls[0]) for s in steps] == [22, 21, 21]
    assert sum(s.headroom for s in steps) == 8 and sum(s.extra["interactive"] for s in steps) == 4
    assert sum(s.queues["m"].capacity for s in steps) == 2 * 64
    assert sum(s.queues["m"].limit("interactive") for s in steps) == 2 * (64 + 4)
    assert sum(s.replica_cap(urls[1]) for s in steps) == 64 + 8 + 4
    # Adaptive N: the bounds are split the same way.
    s = FairQueueStep(
        FairQueueSettings(enabled=True, adaptive={"initial": 32, "min": 4, "max": 256}),
        {"m": EndpointPool.from_urls("m", urls)},
        None,
        workers=4,
        worker_index=3,
    )
    assert s.adaptive_bounds == (1, 8, 64) and s.queues["m"].capacity == 2 * 8


def test_a_granted_request_carries_its_replica_cap_to_the_router():
    async def main() -> None:
        s = step_for(slots_per_replica=3, fair_share_headroom_per_replica=1)
        ctx = ctx_for(principal("a"))
        t = await s.admit(ctx)
        cap = ctx.extra["replica_cap"]
        assert cap("http://10.0.0.1:8000") == 4
        await t.settle(ctx)

    asyncio.run(main())


def test_router_keeps_affinity_within_the_per_replica_budget():
    """Prefix affinity sends every request with one prompt prefix to one replica (while the bounded load
    allows); with a fair-queue cap, no replica gets more than N in flight from this process."""
    pool = EndpointPool.from_urls(
        "m", [f"http://10.0.0.{i}:8000" for i in range(3)], RoutingSettings(load_factor=100.0)
    )
    router = Router(RoutingSettings(load_factor=100.0))
    body = {"model": "m", "prompt": "You are a careful assistant. " * 80}
    picked = []
    for _ in range(9):
        ctx = RequestContext("r", "/v1/completions")
        ctx.body = body
        ctx.extra["replica_cap"] = lambda url: 3
        ep = router.pick(pool, ctx)
        assert ep is not None
        ep.in_flight += 1  # the proxy counts it while the request runs
        picked.append(ep.url)
    assert sorted(e.in_flight for e in pool.endpoints) == [3, 3, 3]
    # The same without a cap: affinity piles everything onto one replica.
    for e in pool.endpoints:
        e.in_flight = 0
    uncapped = set()
    for _ in range(9):
        ctx = RequestContext("r", "/v1/completions")
        ctx.body = body
        ep = router.pick(pool, ctx)
        assert ep is not None
        ep.in_flight += 1
        uncapped.add(ep.url)
    assert len(uncapped) == 1


def test_under_cap_prefers_replicas_below_their_cap_and_degrades_gracefully():
    pool = EndpointPool.from_urls("m", [f"http://10.0.0.{i}:8000" for i in range(3)])
    a, b, c = pool.endpoints
    a.in_flight, b.in_flight, c.in_flight = 4, 2, 4
    caps = {a.url: 4, b.url: 2, c.url: 8}
    assert under_cap(pool.endpoints, caps.__getitem__) == [c]
    c.in_flight = 9
    # All at or over their caps (a replica left while its requests ran): the least over, not nothing.
    assert under_cap(pool.endpoints, caps.__getitem__) == [a, b]
    assert under_cap([], caps.__getitem__) == []
