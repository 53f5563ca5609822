"""Where a pool's replicas come from: a static list, or DNS.

An upstream entry ``dns+http://my-engine-headless.ns.svc.cluster.local:8000`` stands for every A and AAAA
record of that name (a Kubernetes headless Service lists one per ready engine pod), each as
``http://<address>:8000``. The name is re-resolved every ``dns_interval`` seconds; replicas that appear are
probed and join, replicas that vanish leave the pool without a restart (requests already on them finish).
A failed lookup keeps the last known set: a DNS blip must not empty a pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.routing.periodic import PeriodicTask
from gateway.routing.pool import Endpoint, EndpointPool

log = logging.getLogger("gateway.routing")

DNS_PREFIX = "dns+"

Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class DnsTarget:
    scheme: str  # http | https
    host: str
    port: int
    path: str = ""

    def url_for(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_upstreams(entries: list[str]) -> tuple[list[str], list[DnsTarget]]:
    """Split a model's upstream entries into static base URLs and DNS targets."""
    static: list[str] = []
    dns: list[DnsTarget] = []
    for raw in entries:
        entry = raw.strip().rstrip("/")
        if entry.startswith(DNS_PREFIX):
            u = urlsplit(entry[len(DNS_PREFIX) :])
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"bad DNS upstream {raw!r}: expected dns+http://name:port")
            port = u.port or (443 if u.scheme == "https" else 80)
            dns.append(DnsTarget(u.scheme, u.hostname, port, u.path.rstrip("/")))
        else:
            static.append(entry)
    return static, dns


async def resolve_all(host: str, port: int) -> list[str]:
    """Every A/AAAA address of ``host``, sorted, deduplicated."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class DnsDiscovery:
    """Keeps the DNS-named replicas of some pools in step with their records."""

    def __init__(
        self,
        targets: dict[str, tuple[EndpointPool, list[str], list[DnsTarget]]],
        interval: float,
        resolver: Resolver = resolve_all,
        on_added: Callable[[Endpoint], Awaitable[None]] | None = None,
    ) -> None:
        # model -> (pool, static urls, dns targets)
        self.targets = targets
        self.interval = interval
        self.resolver = resolver
        self.on_added = on_added
        self._known: dict[tuple[str, DnsTarget], list[str]] = {}
        self._task: PeriodicTask | None = None

    async def refresh(self) -> None:
        for model, (pool, static, targets) in self.targets.items():
            urls: list[str] = []
            for t in targets:
                try:
                    addrs = await self.resolver(t.host, t.port)
                    self._known[(model, t)] = addrs
                except (TimeoutError, OSError) as e:
                    addrs = self._known.get((model, t), [])
                    log.warning(
                        "DNS lookup of %s failed (%s); keeping %d known replicas",
                        t.host,
                        type(e).__name__,
                        len(addrs),
                    )
                urls.extend(t.url_for(a) for a in addrs)
            before = {e.url for e in pool.endpoints}
            added = pool.replace(urls, static)
            after = {e.url for e in pool.endpoints}
            if before != after:
                log.info(
                    "pool %s replicas changed",
                    model,
                    extra={"added": sorted(after - before), "removed": sorted(before - after)},
                )
            if self.on_added is not None and added:
                await asyncio.gather(*(self.on_added(e) for e in added))

    async def start(self) -> None:
        self._task = PeriodicTask(self.refresh, self.interval, "DNS discovery")
        await self._task.start()

    async def stop(self) -> None:
        if self._task:
            await self._task.stop()
