"""A bounded local fallback for when Redis cannot be reached (``on_backend_error: open``).

Without it each gateway replica's local limiter starts every bucket full: N replicas admit N full bursts
plus N times the rate during an outage (2 gateways with ``rpm: 60`` admitted 142 requests in a 14 s outage).
Two things bound it:

- **The last known shared state.** After every answer from Redis, the local buckets of that request are set
  to the shared buckets' state (their GCRA "theoretical arrival time": now + the seconds of budget in use).
  When Redis goes away, a principal that had spent its burst has still spent it.
- **This replica's share.** Each replica writes a heartbeat into a Redis sorted set and counts the replicas
  seen in the last ``HEARTBEAT_TTL`` seconds; while falling back, a replica enforces 1/N of each limit
  (requests, tokens, concurrency; at least 1). N replicas together then admit about one replica's worth.

Worst case during an outage of T seconds, for one bucket with limit L per minute (documented in
docs/security.md): the burst left when Redis went away (as each replica last saw it, so requests admitted by
other replicas after its last look count again, at most its share of them) plus L * T / 60, plus up to
L * (N - 1) / N for a replica that had never seen this principal (its local bucket starts full at its share),
plus rounding of the share up to 1 per replica. The replica count is the one last seen: a replica that
joined during the outage is not counted (each enforces a larger share).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time

from gateway.quota.limits import Bucket, Decision
from gateway.quota.memory import MemoryLimiter
from gateway.quota.resp import RedisClient

log = logging.getLogger("gateway.quota")

HEARTBEAT_INTERVAL = 5.0
HEARTBEAT_TTL = 15.0


def mirror(local: MemoryLimiter, buckets: tuple[Bucket, ...], decision: Decision) -> None:
    """Set the local buckets of ``buckets`` to the shared state Redis just reported."""
    now = local.clock()
    tat = local._tat
    for b, st in zip(buckets, decision.states, strict=False):
        if b.rpm and st.req_remaining >= 0:
            tat[b.key + ":r"] = now + st.req_reset
        if b.tpm and st.tok_remaining >= 0:
            tat[b.key + ":t"] = now + st.tok_reset


def share(buckets: tuple[Bucket, ...], replicas: int) -> tuple[Bucket, ...]:
    """The buckets with each limit divided among ``replicas`` (rounded up, at least 1), same keys."""
    if replicas <= 1:
        return buckets
    return tuple(
        Bucket(
            b.key,
            math.ceil(b.rpm / replicas) if b.rpm else 0,
            math.ceil(b.tpm / replicas) if b.tpm else 0,
            math.ceil(b.concurrency / replicas) if b.concurrency else 0,
        )
        for b in buckets
    )


class ReplicaCount:
    """How many gateway replicas share the Redis quota state, from heartbeats in a sorted set."""

    def __init__(self, client: RedisClient, prefix: str) -> None:
        self.client = client
        self.key = prefix + "replicas"
        self.member = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.count = 1
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def beat(self) -> int:
        now = time.time()
        res = await self.client.transaction(
            [
                ("ZADD", self.key, now, self.member),
                ("ZREMRANGEBYSCORE", self.key, "-inf", now - HEARTBEAT_TTL),
                ("ZCARD", self.key),
                ("EXPIRE", self.key, int(HEARTBEAT_TTL * 4)),
            ]
        )
        self.count = max(int(res[2]), 1)
        return self.count

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as e:  # Redis down: keep the last count (the fallback uses it)
                log.debug("quota replica heartbeat failed: %s", type(e).__name__)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
