"""Routing state as a typed snapshot, taken at scrape time (no work on the request path).

The metric names live in gateway/metrics/ (the one owner of every name); this module only says what the
routing subsystem knows: per model, its replicas with health, load and fault state, and the retries the
router granted or refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.routing.breaker import HALF_OPEN, OPEN
from gateway.routing.pool import Endpoint, EndpointPool
from gateway.routing.router import Router


@dataclass(frozen=True, slots=True)
class ReplicaSnapshot:
    url: str
    healthy: bool
    # Takes traffic now: healthy, breaker not open, not ejected as an outlier.
    available: bool
    # closed | open | half_open (an open breaker whose open period ended reads half_open: it takes a trial).
    breaker_state: str
    in_flight: int
    engine_waiting: int
    engine_running: int
    kv_cache_usage: float
    attempts: int
    faults: int
    breaker_opened: int
    ejections: int


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    model: str
    replicas: tuple[ReplicaSnapshot, ...]
    retries: int
    retries_refused: int


def replica_snapshot(e: Endpoint, now: float) -> ReplicaSnapshot:
    state = e.breaker.state
    if state == OPEN and e.breaker.allows(now):
        state = HALF_OPEN
    return ReplicaSnapshot(
        url=e.url,
        healthy=e.healthy,
        available=e.available(now),
        breaker_state=state,
        in_flight=e.in_flight,
        engine_waiting=e.engine_waiting,
        engine_running=e.engine_running,
        kv_cache_usage=e.kv_cache_usage,
        attempts=e.requests,
        faults=e.faults,
        breaker_opened=e.breaker.opened_count,
        ejections=e.outlier.ejections,
    )


def routing_snapshot(pools: dict[str, EndpointPool], router: Router | None = None) -> list[PoolSnapshot]:
    now = time.monotonic()
    out = []
    for model, pool in pools.items():
        counts = router.counters(model) if router is not None else None
        out.append(
            PoolSnapshot(
                model=model,
                replicas=tuple(replica_snapshot(e, now) for e in pool.endpoints),
                retries=counts.retries if counts is not None else 0,
                retries_refused=counts.retries_refused if counts is not None else 0,
            )
        )
    return out
