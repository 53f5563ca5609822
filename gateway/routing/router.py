"""The router: picks a replica for a request and learns from each attempt's outcome (passive health).

Faults (``connect``, ``5xx``, ``timeout``, ``broken``: an upstream that failed) feed the replica's circuit
breaker and outlier detector; a client's 4xx is a success (the replica worked). Retries are allowed only
while the pool's retry budget has room and the request has attempts left; the proxy asks only before
anything reached the client.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from gateway.context import RequestContext
from gateway.routing.affinity import affinity_key
from gateway.routing.pipeline import POLICIES, PickContext, RouteRequest, choose
from gateway.routing.pool import Endpoint, EndpointPool
from gateway.routing.retry import RetryBudget
from gateway.settings import RoutingSettings

log = logging.getLogger("gateway.routing")

FAULT_KINDS = ("connect", "5xx", "timeout", "broken")
# ctx.extra key set by the fair queue (gateway/fairqueue/admission.py): the per-replica cap of the request.
REPLICA_CAP_KEY = "replica_cap"


@dataclass(slots=True)
class RetryCounters:
    """Per model: retries granted, and retries the retry budget refused (telemetry reads them)."""

    retries: int = 0
    retries_refused: int = 0


class Router:
    def __init__(
        self, settings: RoutingSettings | None = None, max_retries: int = 2, rng: random.Random | None = None
    ) -> None:
        self.settings = settings or RoutingSettings()
        self.max_retries = max_retries
        self.rng = rng or random.Random()
        self.policy = POLICIES[self.settings.policy]
        self._pick = PickContext(self.rng, self.settings.kv_cache_weight)
        self._budgets: dict[str, RetryBudget] = {}
        # Telemetry: retries taken / refused by the budget, per model. Breaker openings and ejections are
        # counted on each replica's breaker and outlier detector.
        self._counters: dict[str, RetryCounters] = {}

    def counters(self, model: str) -> RetryCounters:
        c = self._counters.get(model)
        if c is None:
            c = self._counters[model] = RetryCounters()
        return c

    def budget(self, pool: EndpointPool) -> RetryBudget:
        b = self._budgets.get(pool.model)
        if b is None:
            s = self.settings
            b = self._budgets[pool.model] = RetryBudget(s.retry_ratio, s.retry_window, s.retry_min)
        return b

    def key_for(self, ctx: RequestContext) -> int | None:
        s = self.settings
        session = ctx.extra.get("session_id")
        prefix = self.policy.prefix_keys
        if session is None and not prefix:
            return None
        return affinity_key(ctx.body if prefix else None, s.prefix_chars, session)

    def pick(
        self, pool: EndpointPool, ctx: RequestContext, exclude: set[str] | frozenset[str] = frozenset()
    ) -> Endpoint | None:
        now = time.monotonic()
        if ctx.attempts == 0:
            self.budget(pool).record_request(now)
            # A key only matters where there is a choice to make (a pool of one replica needs none).
            ctx.extra["affinity_key"] = self.key_for(ctx) if len(pool.endpoints) > 1 else None
        key = ctx.extra.get("affinity_key")
        ep = choose(
            pool.endpoints,
            RouteRequest(exclude, key, ctx.extra.get(REPLICA_CAP_KEY)),
            now,
            self.policy,
            self._pick,
            pool.ring if key is not None else None,
            self.settings.load_factor,
        )
        if ep is not None:
            ep.breaker.acquire(now)
            ep.requests += 1
        return ep

    def may_retry(self, pool: EndpointPool, ctx: RequestContext) -> bool:
        """One more attempt on another replica? Counts against the pool's retry budget when granted."""
        if ctx.attempts > self.max_retries:
            return False
        if not self.budget(pool).try_retry(time.monotonic()):
            self.counters(pool.model).retries_refused += 1
            log.warning("retry budget of pool %s spent", pool.model, extra={"request_id": ctx.request_id})
            return False
        self.counters(pool.model).retries += 1
        return True

    def on_success(self, pool: EndpointPool, ep: Endpoint, ctx: RequestContext) -> None:
        ep.breaker.record_success()
        ep.outlier.record(False)

    def on_abandon(self, pool: EndpointPool, ep: Endpoint, ctx: RequestContext) -> None:
        """The attempt ended without a verdict (the client went away): free a half-open trial slot."""
        ep.breaker.release()

    def on_failure(self, pool: EndpointPool, ep: Endpoint, ctx: RequestContext, kind: str) -> None:
        now = time.monotonic()
        ep.faults += 1
        ep.last_error = kind
        log.warning("upstream fault on %s (%s)", ep.url, kind, extra={"request_id": ctx.request_id})
        if ep.breaker.record_failure(now):
            log.warning(
                "circuit breaker of %s opened for %.1fs after %d faults",
                ep.url,
                ep.breaker.open_for,
                ep.breaker.consecutive,
            )
        ep.outlier.record(True)
        if (
            ep.outlier.should_eject(now)
            and pool.ejected_fraction(now) + 1 / max(len(pool.endpoints), 1)
            <= self.settings.outlier_max_ejected + 1e-9
        ):
            ep.outlier.eject(now)
            log.warning(
                "replica %s ejected as an outlier until +%.1fs", ep.url, ep.outlier.ejected_until - now
            )
