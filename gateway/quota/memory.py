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
        if len(buckets) == 1:
            return self._acquire_one(buckets[0], cost, lease)
        return self._acquire_many(buckets, cost, lease)

    def _acquire_many(self, buckets: tuple[Bucket, ...], cost: int, lease: str) -> Decision:
        now = self.clock()
        tat = self._tat
        reason: str | None = None
        retry = 0.0
        # Per bucket: (requests key, TAT now, TAT after, interval, tokens key, TAT now, TAT after, interval);
        # the states reported are computed once the outcome is known (after on success, before on refusal).
        plan: list[tuple[str, float, float, float, str, float, float, float]] = []
        for b in buckets:
            kr = kt = ""
            cr = nr = ir = ct = nt = it = 0.0
            if b.rpm:
                kr = b.key + ":r"
                ir = PERIOD / b.rpm
                cr = tat.get(kr, now)
                if cr < now:
                    cr = now
                nr = cr + ir
                if nr - now > PERIOD + TOLERANCE:
                    reason = reason or "requests"
                    retry = max(retry, nr - now - PERIOD)
            if b.tpm:
                kt = b.key + ":t"
                it = PERIOD / b.tpm
                ct = tat.get(kt, now)
                if ct < now:
                    ct = now
                nt = ct + cost * it
                if nt - now > PERIOD + TOLERANCE:
                    reason = reason or "tokens"
                    retry = max(retry, nt - now - PERIOD)
            if b.concurrency and len(self._leases.get(b.key, ())) >= b.concurrency:
                reason = reason or "concurrency"
                retry = max(retry, 1.0)
            plan.append((kr, cr, nr, ir, kt, ct, nt, it))
        states: list[BucketState] = []
        refused = reason is not None
        for kr, cr, nr, ir, kt, ct, nt, it in plan:
            st = BucketState()
            if kr:
                st.req_remaining, st.req_reset = gcra_state(cr if refused else nr, now, ir)
                if not refused:
                    tat[kr] = nr
            if kt:
                st.tok_remaining, st.tok_reset = gcra_state(ct if refused else nt, now, it)
                if not refused and cost:
                    tat[kt] = nt
            states.append(st)
        if refused:
            return Decision(False, reason, retry, states)
        for b in buckets:
            if b.concurrency:
                self._leases.setdefault(b.key, set()).add(lease)
        if len(tat) > 50_000:
            self._prune(now)
        return Decision(True, None, 0.0, states)

    def _acquire_one(self, b: Bucket, cost: int, lease: str) -> Decision:
        """:meth:`acquire` for one bucket (the usual case: a principal's own limits), the same arithmetic
        without the per-bucket plan."""
        now = self.clock()
        tat = self._tat
        reason: str | None = None
        retry = 0.0
        limit = PERIOD + TOLERANCE
        st = BucketState()
        if b.rpm:
            ir = b.req_interval
            cr = tat.get(b.req_key, now)
            if cr < now:
                cr = now
            nr = cr + ir
            if nr - now > limit:
                reason = "requests"
                retry = nr - now - PERIOD
        if b.tpm:
            it = b.tok_interval
            ct = tat.get(b.tok_key, now)
            if ct < now:
                ct = now
            nt = ct + cost * it
            if nt - now > limit:
                reason = reason or "tokens"
                retry = max(retry, nt - now - PERIOD)
        if b.concurrency and len(self._leases.get(b.key, ())) >= b.concurrency:
            reason = reason or "concurrency"
            retry = max(retry, 1.0)
        if reason is not None:
            if b.rpm:
                st.req_remaining, st.req_reset = gcra_state(cr, now, ir)
            if b.tpm:
                st.tok_remaining, st.tok_reset = gcra_state(ct, now, it)
            return Decision(False, reason, retry, [st])
        if b.rpm:
            tat[b.req_key] = nr
            used = nr - now
            st.req_remaining = max(int((limit - used) / ir), 0)
            st.req_reset = used
        if b.tpm:
            if cost:
                tat[b.tok_key] = nt
            used = nt - now if nt > now else 0.0
            st.tok_remaining = max(int((limit - used) / it), 0)
            st.tok_reset = used
        if b.concurrency:
            leases = self._leases.get(b.key)
            if leases is None:
                leases = self._leases[b.key] = set()
            leases.add(lease)
        if len(tat) > 50_000:
            self._prune(now)
        return Decision(True, None, 0.0, [st])

    def release(self, buckets: tuple[Bucket, ...], lease: str, token_delta: int) -> None:
        now = self.clock()
        tat = self._tat
        for b in buckets:
            if b.tpm and token_delta:
                k = b.tok_key
                interval = b.tok_interval
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
