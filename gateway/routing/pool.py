"""A model's pool of engine replicas and the per-request choice among them.

The choice is a pipeline of small pure steps over a snapshot of endpoint state: filter (healthy, not
excluded) then pick (least outstanding requests: the gateway's in-flight plus the engine's reported queue).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp

log = logging.getLogger("gateway.routing")


@dataclass(slots=True)
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
    consecutive_failures: int = 0
    last_probe: float = 0.0
    last_error: str | None = None

    @property
    def load(self) -> int:
        return self.in_flight + self.engine_waiting


def healthy_filter(endpoints: list[Endpoint], exclude: set[str] | frozenset[str] = frozenset()) -> list[Endpoint]:
    return [e for e in endpoints if e.healthy and e.url not in exclude]


def least_outstanding(candidates: list[Endpoint]) -> Endpoint | None:
    if not candidates:
        return None
    best = candidates[0]
    for e in candidates[1:]:
        if e.load < best.load:
            best = e
    return best


@dataclass
class EndpointPool:
    model: str
    endpoints: list[Endpoint] = field(default_factory=list)

    @classmethod
    def from_urls(cls, model: str, urls: list[str]) -> EndpointPool:
        return cls(model, [Endpoint(u.rstrip("/")) for u in urls])

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Endpoint | None:
        return least_outstanding(healthy_filter(self.endpoints, exclude))

    @property
    def any_healthy(self) -> bool:
        return any(e.healthy for e in self.endpoints)

    def mark_failure(self, ep: Endpoint, error: str) -> None:
        ep.consecutive_failures += 1
        ep.last_error = error
        if ep.consecutive_failures >= 1:
            ep.healthy = False

    def mark_success(self, ep: Endpoint) -> None:
        ep.consecutive_failures = 0


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
    """Probes every endpoint's ``/health`` periodically and flips its ``healthy`` flag; also scrapes the
    engine's ``/metrics`` for its queue (``vllm:num_requests_waiting``), running count and KV-cache use."""

    def __init__(self, pools: list[EndpointPool], interval: float, timeout: float) -> None:
        self.pools = pools
        self.interval = interval
        self.timeout = timeout
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    async def probe(self, ep: Endpoint) -> None:
        assert self._session is not None
        try:
            async with self._session.get(ep.url + "/health") as r:
                ok = r.status == 200
                await r.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            ok = False
            ep.last_error = type(e).__name__
        ep.last_probe = time.time()
        if ok != ep.healthy:
            log.info("endpoint %s is now %s", ep.url, "healthy" if ok else "unhealthy")
        ep.healthy = ok
        if ok:
            ep.consecutive_failures = 0
            await self.scrape(ep)

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
        eps = [ep for p in self.pools for ep in p.endpoints]
        if eps:
            await asyncio.gather(*(self.probe(ep) for ep in eps))

    async def _run(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # pragma: no cover - never let the prober die
                log.exception("health probe round failed")
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        await self.probe_all()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._session:
            await self._session.close()
