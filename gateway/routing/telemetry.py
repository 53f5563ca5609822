"""Routing state as Prometheus metrics, read at scrape time (no work on the request path).

Labels are the model and the replica URL: bounded by the number of replicas, not by traffic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.routing.breaker import CLOSED, HALF_OPEN, OPEN
from gateway.routing.pool import EndpointPool
from gateway.routing.router import Router

_BREAKER_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class RoutingCollector(Collector):
    def __init__(self, pools: dict[str, EndpointPool], router: Router) -> None:
        self.pools = pools
        self.router = router

    def collect(self) -> Iterator:
        now = time.monotonic()
        healthy = GaugeMetricFamily(
            "llm_gateway_upstream_healthy",
            "1 if the replica passes its /health probes",
            labels=["model", "endpoint"],
        )
        available = GaugeMetricFamily(
            "llm_gateway_upstream_available",
            "1 if the replica takes traffic now (healthy, breaker not open, not ejected)",
            labels=["model", "endpoint"],
        )
        breaker = GaugeMetricFamily(
            "llm_gateway_upstream_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            labels=["model", "endpoint"],
        )
        in_flight = GaugeMetricFamily(
            "llm_gateway_upstream_in_flight",
            "Gateway requests in flight to the replica",
            labels=["model", "endpoint"],
        )
        waiting = GaugeMetricFamily(
            "llm_gateway_upstream_engine_waiting",
            "The engine's queue (vllm:num_requests_waiting)",
            labels=["model", "endpoint"],
        )
        running = GaugeMetricFamily(
            "llm_gateway_upstream_engine_running",
            "The engine's running requests (vllm:num_requests_running)",
            labels=["model", "endpoint"],
        )
        attempts = CounterMetricFamily(
            "llm_gateway_upstream_attempts", "Attempts sent to the replica", labels=["model", "endpoint"]
        )
        faults = CounterMetricFamily(
            "llm_gateway_upstream_faults",
            "Upstream faults (connect, 5xx, timeout, broken stream)",
            labels=["model", "endpoint"],
        )
        replicas = GaugeMetricFamily(
            "llm_gateway_upstream_replicas", "Replicas known to the pool", labels=["model"]
        )
        for model, pool in self.pools.items():
            eps = pool.endpoints
            replicas.add_metric([model], len(eps))
            for e in eps:
                lv = [model, e.url]
                state = e.breaker.state
                if state == OPEN and e.breaker.allows(now):
                    state = HALF_OPEN
                healthy.add_metric(lv, 1 if e.healthy else 0)
                available.add_metric(lv, 1 if e.available(now) else 0)
                breaker.add_metric(lv, _BREAKER_VALUE[state])
                in_flight.add_metric(lv, e.in_flight)
                waiting.add_metric(lv, e.engine_waiting)
                running.add_metric(lv, e.engine_running)
                attempts.add_metric(lv, e.requests)
                faults.add_metric(lv, e.faults)
        r = self.router
        yield from (healthy, available, breaker, in_flight, waiting, running, attempts, faults, replicas)
        yield CounterMetricFamily(
            "llm_gateway_retries",
            "Retries on another replica (before any byte reached the client)",
            value=r.retries,
        )
        yield CounterMetricFamily(
            "llm_gateway_retries_refused", "Retries refused by the retry budget", value=r.retries_refused
        )
        yield CounterMetricFamily(
            "llm_gateway_breaker_opened", "Times a replica's circuit breaker opened", value=r.breaker_opened
        )
        yield CounterMetricFamily(
            "llm_gateway_outlier_ejections", "Times a replica was ejected as an outlier", value=r.ejections
        )
