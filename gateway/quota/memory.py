"""The in-process GCRA limiter: exact for one gateway replica, and the local fallback when Redis is down."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.quota.limits import PERIOD, TOLERANCE, Bucket, BucketState, Decision, gcra_state


class MemoryLimiter:
    """Same arithmetic as the Redis scripts, on a dict. Synchronous: nothing in it awaits, so every
    acquire is atomic with respect to the other requests of this event loop."""

    backend = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}
        self._leases: dict[str, set[str]] = {}

    def acquire(self, buckets: tuple[Bucket, ...], cost: int, lease: str) -> Decision:
        now = self.clock()
        tat = self._tat
        reason: str | None = None
        retry = 0.0
        before: list[BucketState] = []
        after: list[BucketState] = []
        pending: list[tuple[str, float]] = []
        for b in buckets:
            sb, sa = BucketState(), BucketState()
            if b.rpm:
                k = b.key + ":r"
                interval = PERIOD / b.rpm
                cur = max(tat.get(k, now), now)
                new = cur + interval
                sb.req_remaining, sb.req_reset = gcra_state(cur, now, interval)
                sa.req_remaining, sa.req_reset = gcra_state(new, now, interval)
                if new - now > PERIOD + TOLERANCE:
                    reason = reason or "requests"
                    retry = max(retry, new - now - PERIOD)
                pending.append((k, new))
            if b.tpm:
                k = b.key + ":t"
                interval = PERIOD / b.tpm
                cur = max(tat.get(k, now), now)
                new = cur + cost * interval
                sb.tok_remaining, sb.tok_reset = gcra_state(cur, now, interval)
                sa.tok_remaining, sa.tok_reset = gcra_state(new, now, interval)
                if new - now > PERIOD + TOLERANCE:
                    reason = reason or "tokens"
                    retry = max(retry, new - now - PERIOD)
                if cost:
                    pending.append((k, new))
            if b.concurrency and len(self._leases.get(b.key, ())) >= b.concurrency:
                reason = reason or "concurrency"
                retry = max(retry, 1.0)
            before.append(sb)
            after.append(sa)
        if reason is not None:
            return Decision(False, reason, retry, before)
        for k, v in pending:
            tat[k] = v
        for b in buckets:
            if b.concurrency:
                self._leases.setdefault(b.key, set()).add(lease)
        if len(tat) > 50_000:
            self._prune(now)
        return Decision(True, None, 0.0, after)

    def release(self, buckets: tuple[Bucket, ...], lease: str, token_delta: int) -> None:
        now = self.clock()
        tat = self._tat
        for b in buckets:
            if b.tpm and token_delta:
                k = b.key + ":t"
                interval = PERIOD / b.tpm
                if token_delta > 0:
                    tat[k] = max(tat.get(k, now), now) + token_delta * interval
                elif k in tat:
                    tat[k] += token_delta * interval
            if b.concurrency:
                s = self._leases.get(b.key)
                if s is not None:
                    s.discard(lease)
                    if not s:
                        del self._leases[b.key]

    def _prune(self, now: float) -> None:
        for k in [k for k, v in self._tat.items() if v <= now]:
            del self._tat[k]

    def tat(self, key: str) -> float | None:
        """The TAT of a bucket's resource (``<bucket key>:r`` / ``:t``), for tests and introspection."""
        return self._tat.get(key)

    def in_flight(self, bucket_key: str) -> int:
        return len(self._leases.get(bucket_key, ()))
