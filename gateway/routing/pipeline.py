"""The choice of a replica as small pure functions over a snapshot of replica state.

filters (which replicas may take this request, and which are under the request's per-replica cap) -> scorers (how loaded each one is, lower is better) ->
picker (one of them), in the style of the llm-d inference scheduler. Nothing here does I/O or mutates a
replica; the router applies the outcome. Every step is unit-tested without a network.

A routing policy (``routing.policy`` in the settings) names the scorer and picker for requests without an
affinity key, and whether a prompt's prefix makes a key. A request with a key (a session header, or, under
``prefix_affinity``, a prompt at least ``prefix_chars`` long) goes to the first replica clockwise on a
consistent-hash ring whose load stays within ``ceil(load_factor x mean)``, whatever the policy.

A request granted a fair-queue slot carries a per-replica cap (the gateway's budget N on each replica, see
gateway/fairqueue/): only replicas where this process has fewer than that many requests in flight are
candidates, so neither affinity nor a policy can put more than N on one replica.

=====================  ============================================================================
policy                 requests without an affinity key go to
=====================  ============================================================================
``prefix_affinity``    the least outstanding replica; prompt prefixes are affinity keys (default)
``least_outstanding``  the least outstanding replica (ties at random)
``power_of_two``       the less outstanding of two replicas drawn at random (no herd on one idle replica
                       when many gateways share stale engine readings)
``kv_cache_aware``     the lowest sum of outstanding load (normalised over the candidates) and the
                       engine's KV-cache use (``vllm:kv_cache_usage_perc``) x ``kv_cache_weight``
=====================  ============================================================================
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

from gateway.routing.affinity import HashRing, bounded_load_pick


class Replica(Protocol):
    """What the pipeline reads of a replica (gateway.routing.pool.Endpoint is one)."""

    url: str
    kv_cache_usage: float
    # Requests this gateway process has open to the replica now.
    in_flight: int

    @property
    def load(self) -> int: ...

    def available(self, now: float) -> bool: ...


R = TypeVar("R", bound=Replica)


@dataclass(slots=True, init=False)
class RouteRequest:
    """What the pipeline knows about a request: replicas already tried and its affinity key (or None)."""

    exclude: frozenset[str] | set[str]
    key: int | None
    # Per-replica cap on this process's in-flight requests (replica URL -> cap), or None: no cap.
    cap: Callable[[str], int] | None

    # Written out (init=False): a generated __init__ would run as interpreted code in a compiled module.
    def __init__(
        self,
        exclude: frozenset[str] | set[str] = frozenset(),
        key: int | None = None,
        cap: Callable[[str], int] | None = None,
    ) -> None:
        self.exclude = exclude
        self.key = key
        self.cap = cap


@dataclass(frozen=True, slots=True)
class PickContext:
    """What a picker may use besides the candidates."""

    rng: random.Random
    kv_cache_weight: float = 1.0


# -- filters ------------------------------------------------------------------------------------------------


def available(endpoints: Iterable[R], now: float, exclude: Iterable[str] = frozenset()) -> list[R]:
    """Replicas that passed their health probes, whose breaker lets traffic through, that are not ejected
    as outliers and that this request has not already tried."""
    ex = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
    return [e for e in endpoints if e.url not in ex and e.available(now)]


def under_cap(candidates: Sequence[R], cap: Callable[[str], int]) -> list[R]:
    """Candidates where this process has fewer requests in flight than ``cap(url)``. If none is (a transient:
    the fair queue grants at most the sum of the caps, but a replica may leave while its requests run), the
    ones least over their cap, so the request still goes somewhere and the excess is spread."""
    over = [c.in_flight - cap(c.url) for c in candidates]
    if not over:
        return []
    least = min(over)
    if least < 0:
        return [c for c, o in zip(candidates, over, strict=True) if o < 0]
    return [c for c, o in zip(candidates, over, strict=True) if o == least]


# -- scorers (lower is better; one score per candidate) -----------------------------------------------------


def outstanding_scores(candidates: Sequence[Replica]) -> list[float]:
    """Outstanding requests: the engine's reported queue plus the larger of the gateway's live in-flight
    count and the engine's reported running count (which includes other gateways' requests)."""
    return [float(e.load) for e in candidates]


def kv_cache_scores(candidates: Sequence[Replica]) -> list[float]:
    """The engine's KV-cache use, 0..1 (from its last /metrics scrape; 0 when never scraped)."""
    return [min(max(e.kv_cache_usage, 0.0), 1.0) for e in candidates]


def kv_cache_aware_scores(candidates: Sequence[Replica], kv_cache_weight: float) -> list[float]:
    """Outstanding load normalised to 0..1 over the candidates, plus KV-cache use x ``kv_cache_weight``:
    between two equally busy replicas, the one with more free KV cache (less preemption ahead) wins."""
    load = outstanding_scores(candidates)
    top = max(load)
    kv = kv_cache_scores(candidates)
    return [(q / top if top > 0 else 0.0) + kv_cache_weight * k for q, k in zip(load, kv, strict=True)]


# -- pickers ------------------------------------------------------------------------------------------------


def lowest(candidates: Sequence[R], scores: Sequence[float], rng: random.Random | None = None) -> R | None:
    """The lowest score; ties broken at random so idle replicas share the traffic."""
    if not candidates:
        return None
    best_score = min(scores)
    best = [c for c, s in zip(candidates, scores, strict=True) if s == best_score]
    if len(best) == 1:
        return best[0]
    return (rng or random).choice(best)


def least_outstanding(candidates: Sequence[R], rng: random.Random | None = None) -> R | None:
    return lowest(candidates, outstanding_scores(candidates), rng)


def power_of_two(candidates: Sequence[R], rng: random.Random | None = None) -> R | None:
    """Two distinct candidates drawn at random; the less outstanding of the two (the first on a tie)."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    a, b = (rng or random).sample(range(len(candidates)), 2)
    ca, cb = candidates[a], candidates[b]
    return cb if cb.load < ca.load else ca


# -- policies -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    # Picks one of the (filtered, non-empty) candidates of a request without an affinity key.
    pick: Callable[[Sequence[Replica], PickContext], Replica | None]
    # Whether a prompt's prefix is an affinity key (a session header always is).
    prefix_keys: bool = False


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("prefix_affinity", lambda c, x: least_outstanding(c, x.rng), prefix_keys=True),
        Policy("least_outstanding", lambda c, x: least_outstanding(c, x.rng)),
        Policy("power_of_two", lambda c, x: power_of_two(c, x.rng)),
        Policy("kv_cache_aware", lambda c, x: lowest(c, kv_cache_aware_scores(c, x.kv_cache_weight), x.rng)),
    )
}


def choose(
    endpoints: Sequence[R],
    req: RouteRequest,
    now: float,
    policy: Policy,
    pick: PickContext,
    ring: HashRing | None = None,
    load_factor: float = 1.25,
) -> R | None:
    """The whole pipeline: filter, then bounded-load affinity when the request has a key, else the
    policy's scorer and picker."""
    candidates = available(endpoints, now, req.exclude)
    if req.cap is not None:
        candidates = under_cap(candidates, req.cap)
    if not candidates:
        return None
    if len(candidates) == 1:  # nothing to choose between (every policy picks the only candidate)
        return candidates[0]
    if req.key is not None and ring is not None:
        return cast("R | None", bounded_load_pick(ring, req.key, candidates, load_factor))
    return cast("R | None", policy.pick(candidates, pick))
