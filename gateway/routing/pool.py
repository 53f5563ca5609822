"""A model's pool of engine replicas, each with its health, load and fault state, and the active prober.

Replicas come from a static list or from DNS (``dns+http://name:port``, see discovery.py); the pool's
``endpoints`` list is replaced as a whole when the set changes, so a request always routes over a
consistent snapshot, and a replica that left keeps serving the requests it already has.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from gateway.routing.affinity import HashRing
from gateway.routing.breaker import CircuitBreaker, OutlierDetector
from gateway.routing.catalog import EngineCatalog, describe
from gateway.routing.periodic import PeriodicTask
from gateway.settings import RoutingSettings

log = logging.getLogger("gateway.routing")


@dataclass(slots=True, eq=False)
class Endpoint:
    url: str
    healthy: bool = True
    in_flight: int = 0
    # From the engine's /metrics when scraped (vllm:num_requests_waiting / running).
    engine_waiting: int = 0
    engine_running: int = 0
    kv_cache_usage: float = 0.0
    # When the engine's /metrics was last read (0 = never).
    metrics_at: float = 0.0
    consecutive_failures: int = 0  # failed /health probes in a row
    last_probe: float = 0.0
    last_error: str | None = None
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    outlier: OutlierDetector = field(default_factory=OutlierDetector)
    # Counters for telemetry.
    requests: int = 0
    faults: int = 0
    # What the replica serves (models, routes), refreshed with the probes (gateway/routing/catalog.py).
    catalog: EngineCatalog | None = None

    @property
    def load(self) -> int:
        """Outstanding work: the engine's queue plus what it runs. The gateway's own in-flight count is live;
        the engine's running count (last scrape) also holds other gateways' requests: take the larger."""
        running = self.engine_running if self.engine_running > self.in_flight else self.in_flight
        return running + self.engine_waiting

    def available(self, now: float) -> bool:
        return self.healthy and self.breaker.allows(now) and not self.outlier.ejected(now)


@dataclass
class EndpointPool:
    model: str
    endpoints: list[Endpoint] = field(default_factory=list)
    settings: RoutingSettings = field(default_factory=RoutingSettings)
    _ring: HashRing | None = field(default=None, repr=False)

    @classmethod
    def from_urls(cls, model: str, urls: list[str], settings: RoutingSettings | None = None) -> EndpointPool:
        pool = cls(model, settings=settings or RoutingSettings())
        pool.endpoints = [pool.new_endpoint(u.rstrip("/")) for u in urls]
        return pool

    def new_endpoint(self, url: str, healthy: bool = True) -> Endpoint:
        s = self.settings
        return Endpoint(
            url,
            healthy=healthy,
            breaker=CircuitBreaker(s.breaker_failures, s.breaker_open, s.breaker_max_open),
            outlier=OutlierDetector(
                s.outlier_window, s.outlier_min_requests, s.outlier_ratio, s.outlier_eject, s.breaker_max_open
            ),
        )

    @property
    def ring(self) -> HashRing:
        urls = [e.url for e in self.endpoints]
        if self._ring is None or self._ring.urls != frozenset(urls):
            self._ring = HashRing(urls, self.settings.virtual_nodes)
        return self._ring

    def replace(self, urls: list[str], static: list[str] | None = None) -> list[Endpoint]:
        """Make the pool's replicas ``urls`` (+ ``static``), keeping the state of those that stay.
        Returns the endpoints that are new (they start unhealthy until probed)."""
        current = {e.url: e for e in self.endpoints}
        wanted = list(dict.fromkeys([*(static or []), *urls]))
        added = [self.new_endpoint(u, healthy=False) for u in wanted if u not in current]
        new_by_url = {e.url: e for e in added}
        self.endpoints = [current.get(u) or new_by_url[u] for u in wanted]
        return added

    @property
    def any_healthy(self) -> bool:
        return any(e.healthy for e in self.endpoints)

    def ejected_fraction(self, now: float) -> float:
        if not self.endpoints:
            return 0.0
        return sum(1 for e in self.endpoints if e.outlier.ejected(now)) / len(self.endpoints)


_GAUGES = {
    b"vllm:num_requests_waiting": "engine_waiting",
    b"vllm:num_requests_running": "engine_running",
    b"vllm:kv_cache_usage_perc": "kv_cache_usage",
}


def parse_engine_metrics(text: bytes) -> dict[str, float]:
    """The load gauges from a vLLM /metrics scrape, summed over label sets (engines, model names)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(b"vllm:"):
            continue
        name = line.split(b"{", 1)[0].split(b" ", 1)[0]
        attr = _GAUGES.get(name)
        if attr is None:
            continue
        try:
            out[attr] = out.get(attr, 0.0) + float(line.rsplit(b" ", 1)[1])
        except ValueError:
            continue
    return out


class HealthChecker:
    """Probes every endpoint's ``/health`` periodically: ``unhealthy_after`` failures in a row take a replica
    out of rotation, one success brings it back. Also scrapes the engine's ``/metrics`` for its queue
    (``vllm:num_requests_waiting``), running count and KV-cache use, which feed the load scores."""

    def __init__(
        self,
        pools: list[EndpointPool],
        interval: float,
        timeout: float,
        unhealthy_after: int = 2,
        api_keys: dict[str, str | None] | None = None,
        describe_engines: bool = True,
    ) -> None:
        self.pools = pools
        self.interval = interval
        self.timeout = timeout
        self.unhealthy_after = unhealthy_after
        # The engines' own API key per model (vLLM --api-key guards /v1/models) for the catalog reads.
        self.api_keys: dict[str, str | None] = dict(api_keys or {})
        self.describe_engines = describe_engines
        self._task: PeriodicTask | None = None
        self._session: aiohttp.ClientSession | None = None

    async def probe(self, ep: Endpoint, api_key: str | None = None) -> None:
        if self._session is None:
            return
        gone = False
        try:
            async with self._session.get(ep.url + "/health") as r:
                ok = r.status == 200
                await r.read()
                if not ok:
                    ep.last_error = f"health {r.status}"
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            ok = False
            ep.last_error = type(e).__name__
            # A replica that refuses connections is gone: no need to wait for a second probe.
            gone = isinstance(e, aiohttp.ClientConnectorError)
        ep.last_probe = time.time()
        if ok:
            ep.consecutive_failures = 0
            came_back = not ep.healthy
            if came_back:
                log.info("endpoint %s is now healthy", ep.url)
            ep.healthy = True
            await self.scrape(ep)
            if self.describe_engines:
                # A replica that came back may be a new engine (other adapters, other routes).
                await describe(self._session, ep, api_key, force=came_back)
            return
        ep.consecutive_failures += 1
        if ep.healthy and (gone or ep.consecutive_failures >= self.unhealthy_after):
            log.warning("endpoint %s is now unhealthy (%s)", ep.url, ep.last_error)
            ep.healthy = False

    async def scrape(self, ep: Endpoint) -> None:
        assert self._session is not None
        try:
            async with self._session.get(ep.url + "/metrics") as r:
                if r.status != 200:
                    return
                values = parse_engine_metrics(await r.read())
        except (TimeoutError, aiohttp.ClientError, OSError):
            return
        ep.engine_waiting = int(values.get("engine_waiting", 0))
        ep.engine_running = int(values.get("engine_running", 0))
        ep.kv_cache_usage = values.get("kv_cache_usage", 0.0)
        ep.metrics_at = time.time()

    async def probe_all(self) -> None:
        probes = [self.probe(ep, self.api_keys.get(p.model)) for p in self.pools for ep in p.endpoints]
        if probes:
            await asyncio.gather(*probes)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = PeriodicTask(self.probe_all, self.interval, "health probe")
        await self._task.start()

    async def stop(self) -> None:
        if self._task:
            await self._task.stop()
        if self._session:
            await self._session.close()
            self._session = None
