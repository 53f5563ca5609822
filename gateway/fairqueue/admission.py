"""The fair-queue admission step: a slot per request, held until the response ends, granted fairly.

Per model, ``slots_per_replica`` x available replicas requests are in flight at once (plus each class's
extra slots); the rest wait here in a :class:`~gateway.fairqueue.scheduler.FairQueue`. The budget is per
replica: the router sends a granted request only to a replica that holds fewer than its share
(:meth:`FairQueueStep.replica_cap`), so prefix affinity cannot pile more than N onto one replica. With
``workers`` > 1 the per-replica numbers (N, headroom, extra slots, adaptive bounds) are split between the
worker processes (:func:`worker_share`), so the engine still sees at most N from this gateway. The class comes from
the request header (``class_header``) or the principal's default, limited to the classes its entries and
JWT scopes allow. A request predicted to wait longer than its class's ``max_wait`` is refused at once with
503 + Retry-After; one still waiting when ``max_wait`` runs out gets the same answer then.

The slot is released by the ticket's ``settle`` (the proxy settles exactly once when the response ended:
completed, failed, or the client went away), and by cancellation while waiting: a slot is never leaked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from prometheus_client import CollectorRegistry

from gateway.auth.principal import Principal
from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.fairqueue.config import FairQueueSettings, FairShare
from gateway.fairqueue.metrics import FairQueueMetrics
from gateway.fairqueue.scheduler import FairQueue, Waiter
from gateway.routing.pool import EndpointPool
from gateway.routing.router import REPLICA_CAP_KEY

log = logging.getLogger("gateway.fairqueue")

CLASS_KEY = "priority_class"
HEADERS_KEY = "request_headers"


def worker_share(n: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of a per-replica number ``n`` split between ``workers`` processes: the parts
    differ by at most one and add up to ``n``, except that a positive ``n`` smaller than ``workers`` gives
    every worker 1 (a worker with no slot could serve nobody)."""
    if n <= 0 or workers <= 1:
        return max(n, 0)
    base, rest = divmod(n, workers)
    return max(1, base + (1 if index % workers < rest else 0))


class SlotTicket:
    """Holds one slot; ``settle`` gives it back (idempotent)."""

    __slots__ = ("step", "model", "waiter")

    def __init__(self, step: FairQueueStep, model: str, waiter: Waiter) -> None:
        self.step = step
        self.model = model
        self.waiter = waiter

    async def settle(self, ctx: RequestContext) -> None:
        self.step.release(self.model, self.waiter)


class FairQueueStep:
    """Admission step ``fair_queue``: one :class:`FairQueue` per model, sized from its pool."""

    name = "fair_queue"

    def __init__(
        self,
        settings: FairQueueSettings,
        pools: dict[str, EndpointPool],
        registry: CollectorRegistry | None = None,
        workers: int = 1,
        worker_index: int = 0,
    ) -> None:
        self.settings = settings
        self.pools = pools
        self.classes = settings.classes
        # This process's share of each per-replica number (all of it with one worker).
        self.workers, self.worker_index = max(1, workers), worker_index

        def share(n: int) -> int:
            return worker_share(n, self.workers, worker_index)

        self.share = share
        self.fixed = share(settings.slots_per_replica)
        self.headroom = share(settings.fair_share_headroom_per_replica)
        self.extra = {name: share(c.extra_slots_per_replica) for name, c in self.classes.items()}
        a = settings.adaptive
        self.adaptive_bounds = (share(a.min), share(a.initial), share(a.max))
        self.queues: dict[str, FairQueue] = {}
        self.class_header = settings.class_header.lower().encode("latin-1") if settings.class_header else b""
        # Adaptive budget: slots per replica URL (when slots_per_replica == 0).
        self.slots: dict[str, int] = {}
        self.metrics = FairQueueMetrics(self, registry, settings)
        self._task: asyncio.Task[None] | None = None
        for model, pool in pools.items():
            q = self.queues[model] = FairQueue(
                {n: (c.rank, 0) for n, c in self.classes.items()}, self._weights, settings.hold_ewma
            )
            self._resize(model, pool, q, time.monotonic())

    # -- shares and classes ----------------------------------------------------------------------------------

    def _share(self, principal: Principal) -> tuple[FairShare | None, FairShare | None]:
        s = self.settings
        p = s.principals.get(principal.key_id or "") if principal.key_id else None
        if p is None:
            p = s.principals.get(principal.subject)
        return p, s.tenants.get(principal.tenant)

    def _weights(self, tenant: str, principal: str) -> tuple[float, float]:
        s = self.settings
        t = s.tenants.get(tenant)
        p = s.principals.get(principal)
        return (t.weight if t else s.default.weight, p.weight if p else 1.0)

    def allowed_classes(self, principal: Principal) -> list[str]:
        p, t = self._share(principal)
        allowed: list[str] | None = None
        for share in (p, t, self.settings.default):
            if share is not None and share.classes is not None:
                allowed = list(share.classes)
                break
        if allowed is None:
            allowed = list(self.classes)
        for scope in principal.scopes:
            for c in self.settings.scope_classes.get(scope, ()):
                if c not in allowed:
                    allowed.append(c)
        return allowed

    def resolve_class(self, principal: Principal, requested: str | None) -> str:
        allowed = self.allowed_classes(principal)
        if requested:
            if requested not in self.classes:
                raise ApiError(
                    400,
                    f"Unknown priority class '{requested}' (known: {', '.join(sorted(self.classes))}).",
                    param=self.settings.class_header or None,
                    code="invalid_priority_class",
                )
            if requested not in allowed:
                raise ApiError(
                    403,
                    f"This key may not use priority class '{requested}' (allowed: {', '.join(allowed) or 'none'}).",
                    param=self.settings.class_header or None,
                    code="priority_class_not_allowed",
                    reason="forbidden",
                )
            return requested
        p, t = self._share(principal)
        for share in (p, t, self.settings.default):
            if share is not None and share.default_class and share.default_class in allowed:
                return share.default_class
        if not allowed:
            raise ApiError(
                403,
                "This key may not use any priority class.",
                code="priority_class_not_allowed",
                reason="forbidden",
            )
        # The most urgent class it may use: classes are opt-in downgrades unless configured otherwise.
        return min(allowed, key=lambda c: (self.classes[c].rank, c))

    def requested_class(self, ctx: RequestContext) -> str | None:
        headers = ctx.extra.pop(HEADERS_KEY, None)
        if not self.class_header or not headers:
            return None
        for k, v in headers:
            if k == self.class_header:
                return v.decode("latin-1").strip().lower() or None
        return None

    def cost(self, ctx: RequestContext) -> float:
        s = self.settings
        if s.cost == "requests":
            return 1.0
        mt = ctx.max_tokens if ctx.max_tokens is not None else s.default_max_tokens
        return max(1.0, ctx.prompt_chars / s.chars_per_token + mt)

    # -- capacity --------------------------------------------------------------------------------------------

    def slots_of(self, url: str) -> int:
        """This process's budget on one replica: the fixed share, or the adaptive value for that replica."""
        return self.fixed or self.slots.setdefault(url, self.adaptive_bounds[1])

    def replica_cap(self, url: str) -> int:
        """Most requests (granted slots) this process may have in flight on the replica ``url`` at once,
        headroom and class extra slots included: the router's per-replica filter."""
        return self.slots_of(url) + self.headroom + max(self.extra.values(), default=0)

    def _resize(self, model: str, pool: EndpointPool, q: FairQueue, now: float) -> list[Waiter]:
        mono = time.monotonic()
        cap = 0
        n = 0
        for ep in pool.endpoints:
            if not ep.available(mono):
                continue
            n += 1
            cap += self.slots_of(ep.url)
        extra = {name: e * n for name, e in self.extra.items()}
        return q.set_capacity(cap, extra, self.headroom * n)

    def adapt(self) -> None:
        """Adjust the adaptive per-replica budgets from the engines' last scraped metrics. With several
        workers each one adapts its own share (bounds split like N) from the engine's shared readings."""
        a = self.settings.adaptive
        lo, initial, hi = self.adaptive_bounds
        fresh = time.time() - max(10.0, 5 * a.interval)
        for model, pool in self.pools.items():
            q = self.queues[model]
            for ep in pool.endpoints:
                n = self.slots.setdefault(ep.url, initial)
                if ep.metrics_at < fresh:
                    continue
                if ep.engine_waiting > 0:
                    # The engine queues part of what it was sent: it runs at most what it runs now (this
                    # worker's part of it).
                    running = -(-ep.engine_running // self.workers) if ep.engine_running else n
                    shrink = max(1, ep.engine_waiting // (2 * self.workers))
                    n = max(lo, min(n, running) - shrink)
                elif q.queued and ep.in_flight >= n and ep.kv_cache_usage < a.kv_high:
                    n = min(hi, n + max(1, n // 8))
                self.slots[ep.url] = n

    def tick(self) -> None:
        now = time.monotonic()
        if not self.settings.slots_per_replica:
            self.adapt()
        for model, pool in self.pools.items():
            q = self.queues[model]
            self._resize(model, pool, q, now)
            q.prune()

    async def _run(self) -> None:
        interval = self.settings.adaptive.interval if not self.settings.slots_per_replica else 0.5
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:  # never let the loop die
                log.exception("fair queue tick failed")

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # -- the step --------------------------------------------------------------------------------------------

    async def admit(self, ctx: RequestContext) -> SlotTicket | None:
        if self._task is None:
            await self.start()  # the budget/prune tick, started with the first request (inside the loop)
        model = ctx.model
        q = self.queues.get(model or "")
        if q is None or model is None:
            return None
        principal = ctx.principal
        if principal is None:
            return None
        cls = self.resolve_class(principal, self.requested_class(ctx))
        ctx.extra[CLASS_KEY] = cls
        pc = self.classes[cls]
        tenant, who = principal.tenant, principal.key_id or principal.subject
        cost = self.cost(ctx)
        now = time.monotonic()
        self._resize(model, self.pools[model], q, now)
        w = Waiter(tenant, who, cls, cost, now)
        if q.limit(cls) <= 0:
            # No replica can take it now: let the proxy give its usual answer (503 no healthy replica).
            q.grant_unlimited(w, now)
            return SlotTicket(self, model, w)
        if q.queued >= self.settings.max_queued and self.settings.max_queued >= 0:
            if q.in_use >= q.limit(cls):
                raise self._shed(model, cls, tenant, "queue_full", None)
        predicted = q.predict_wait(tenant, who, cls, cost)
        if predicted is not None and predicted > pc.max_wait:
            raise self._shed(model, cls, tenant, "predicted_wait", predicted)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake(_: Waiter) -> None:
            if not fut.done():
                fut.set_result(None)

        w.notify = wake
        if q.request(w, now):
            self.metrics.observe_wait(model, cls, tenant, 0.0)
            return self._ticket(ctx, model, w)
        try:
            async with asyncio.timeout(pc.max_wait):
                await fut
        except TimeoutError:
            if not w.granted:
                q.cancel(w, time.monotonic())
                raise self._shed(model, cls, tenant, "wait_timeout", pc.max_wait) from None
        except BaseException:
            # Cancelled (client gone, shutdown): leave the queue, or give back a slot granted meanwhile.
            q.cancel(w, time.monotonic())
            raise
        waited = time.monotonic() - now
        ctx.extra["queue_wait"] = waited
        self.metrics.observe_wait(model, cls, tenant, waited)
        return self._ticket(ctx, model, w)

    def _ticket(self, ctx: RequestContext, model: str, w: Waiter) -> SlotTicket:
        if not w.unlimited:
            ctx.extra[REPLICA_CAP_KEY] = self.replica_cap
        if self.settings.engine_priority:
            # A tenant below its fair share is also first in the engine's own queue (within its class).
            ctx.extra["engine_priority"] = self.classes[w.cls].engine_priority - (1 if w.under_share else 0)
        return SlotTicket(self, model, w)

    def release(self, model: str, w: Waiter) -> None:
        """Free ``w``'s slot; the waiters it lets in are woken by their ``notify`` callbacks."""
        q = self.queues.get(model)
        if q is not None:
            q.release(w, time.monotonic())

    def _shed(self, model: str, cls: str, tenant: str, why: str, wait: float | None) -> ApiError:
        s = self.settings
        self.metrics.shed(model, cls, tenant, why)
        retry = (
            s.retry_after_min
            if wait is None
            else min(max(math.ceil(wait), s.retry_after_min), s.retry_after_max)
        )
        if why == "queue_full":
            msg = f"The model '{model}' is saturated and its queue is full; retry later."
        elif why == "predicted_wait":
            msg = f"The model '{model}' is saturated: the predicted wait ({wait:.1f}s) exceeds the '{cls}' class's budget; retry later."
        else:
            msg = f"The model '{model}' is saturated: no slot freed within the '{cls}' class's budget; retry later."
        return ApiError(
            503, msg, code="engine_overloaded", headers={"retry-after": str(retry)}, reason="overloaded"
        )
