"""The choice of a replica as small pure functions over a snapshot of endpoint state.

filters (which replicas may take this request) -> scorers (how good each one is) -> picker (one of them).
Nothing here does I/O or mutates an endpoint; the router applies the outcome. Each step is unit-tested
without a network.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.routing.affinity import HashRing, bounded_load_pick
from gateway.routing.pool import Endpoint


@dataclass(slots=True)
class RouteRequest:
    """What the pipeline knows about a request: replicas already tried and its affinity key (or None)."""

    exclude: frozenset[str] | set[str] = frozenset()
    key: int | None = None


# -- filters ------------------------------------------------------------------------------------------------


def available(
    endpoints: Iterable[Endpoint], now: float, exclude: Iterable[str] = frozenset()
) -> list[Endpoint]:
    """Replicas that passed their health probes, whose breaker lets traffic through, that are not ejected
    as outliers and that this request has not already tried."""
    ex = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
    return [e for e in endpoints if e.url not in ex and e.available(now)]


# -- scorers (lower is better) ------------------------------------------------------------------------------


def outstanding_score(e: Endpoint) -> float:
    """Outstanding requests: the engine's reported queue plus the larger of the gateway's live in-flight
    count and the engine's reported running count (which includes other gateways' requests)."""
    return float(e.load)


# -- pickers ------------------------------------------------------------------------------------------------


def least_outstanding(candidates: Sequence[Endpoint], rng: random.Random | None = None) -> Endpoint | None:
    """The lowest outstanding score; ties broken at random so idle replicas share the traffic."""
    if not candidates:
        return None
    best: list[Endpoint] = []
    best_score = float("inf")
    for e in candidates:
        s = outstanding_score(e)
        if s < best_score:
            best_score, best = s, [e]
        elif s == best_score:
            best.append(e)
    if len(best) == 1:
        return best[0]
    return (rng or random).choice(best)


def choose(
    endpoints: Sequence[Endpoint],
    req: RouteRequest,
    now: float,
    ring: HashRing | None = None,
    load_factor: float = 1.25,
    rng: random.Random | None = None,
) -> Endpoint | None:
    """The whole pipeline: filter, then bounded-load affinity when the request has a key, else least
    outstanding."""
    candidates = available(endpoints, now, req.exclude)
    if not candidates:
        return None
    if req.key is not None and ring is not None and len(candidates) > 1:
        return bounded_load_pick(ring, req.key, candidates, load_factor)
    return least_outstanding(candidates, rng)
