"""The quota step of the admission chain: reserve at admission, settle on real usage.

Per request: the buckets that apply are a cached lookup, the reservation is arithmetic on what the proxy
already parsed (``prompt_chars``, ``max_tokens``), and the limiter is called once (one Redis round trip with
the Redis backend); settling is one more round trip, skipped when there is nothing to correct.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

from gateway.context import RequestContext, unique_id
from gateway.errors import ApiError
from gateway.hooks import NO_TICKET, Ticket
from gateway.quota.config import QuotaSettings
from gateway.quota.fallback import ReplicaCount, mirror, share
from gateway.quota.limits import (
    Bucket,
    Decision,
    LimitTable,
    estimate_prompt_tokens,
    format_reset,
    rate_limit_headers,
)
from gateway.quota.memory import MemoryLimiter
from gateway.quota.metrics import QuotaMetrics
from gateway.quota.redis_backend import RedisLimiter
from gateway.quota.resp import RedisError
from gateway.routes import ROUTES_BY_NAME

log = logging.getLogger("gateway.quota")

# What a Redis call raises when the backend, not the request, is at fault: error replies, lost or refused
# connections, timeouts, too many commands waiting (gateway/quota/resp.py raises only RedisError subclasses).
BACKEND_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
_LOG_EVERY = 10.0
# Settlements that failed while Redis was down, replayed once it answers again (bounded: oldest dropped).
_MAX_DEFERRED = 10_000


def _needs_lease(buckets: tuple[Bucket, ...]) -> bool:
    for b in buckets:
        if b.concurrency:
            return True
    return False


class QuotaTicket:
    """A reservation: ``cost`` tokens and (when limited) a concurrency slot, returned or corrected by settle."""

    __slots__ = ("admission", "limiter", "buckets", "cost", "lease")

    def __init__(
        self,
        admission: QuotaAdmission,
        limiter: MemoryLimiter | RedisLimiter,
        buckets: tuple[Bucket, ...],
        cost: int,
        lease: str,
    ) -> None:
        self.admission = admission
        self.limiter = limiter
        self.buckets = buckets
        self.cost = cost
        self.lease = lease

    async def settle(self, ctx: RequestContext) -> None:
        real = ctx.total_tokens
        if real is not None:
            delta = real - self.cost
        elif ctx.first_token_at is None:
            delta = -self.cost  # nothing was generated (refused upstream, failed before the first byte)
        else:
            delta = 0  # a stream cut short without usage: keep the reservation
        ctx.extra["quota_settled_tokens"] = self.cost + delta
        limiter = self.limiter
        if isinstance(limiter, MemoryLimiter):
            limiter.release(self.buckets, self.lease, delta)
            return
        try:
            await limiter.release(self.buckets, self.lease, delta)
        except BACKEND_ERRORS as e:
            self.admission.metrics.settle_errors.labels(limiter.backend).inc()
            self.admission.backend_failed(e, settle=True)
            self.admission.defer_settlement(self.buckets, self.lease, delta)


class QuotaAdmission:
    """Admission step: refuses a request larger than a TPM limit at once, then enforces the limits."""

    name = "quota"

    def __init__(self, settings: QuotaSettings, metrics: QuotaMetrics | None = None) -> None:
        self.settings = settings
        self.table = LimitTable(settings)
        # Plain counts, exported by gateway/metrics/ (create_app passes the instance it exports).
        self.metrics = metrics if metrics is not None else QuotaMetrics()
        self.local = MemoryLimiter()
        self.remote: RedisLimiter | None = None
        if settings.backend == "redis":
            self.remote = RedisLimiter(
                settings.redis_url,
                prefix=settings.key_prefix,
                timeout=settings.redis_timeout,
                lease_seconds=settings.concurrency_lease,
                connections=settings.redis_max_connections,
                max_pending=settings.redis_max_pending,
            )
            self.metrics.backend_up.labels("redis").set(1)
        self.has_limits = settings.has_limits
        self._down_until = 0.0
        self._down = False
        self._last_log = 0.0
        self._deferred: deque[tuple[tuple[Bucket, ...], str, int]] = deque(maxlen=_MAX_DEFERRED)
        self._replay: asyncio.Task[None] | None = None
        self.replicas: ReplicaCount | None = None

    # -- the hook -------------------------------------------------------------------------------------------

    async def admit(self, ctx: RequestContext) -> Ticket:
        p = ctx.principal
        if not self.has_limits or p is None or ctx.model is None:
            return NO_TICKET
        buckets = self.table.buckets(p.id, p.quota_names, p.tenant, ctx.model)
        if not buckets:
            return NO_TICKET
        cost = self.reservation(ctx)
        ctx.extra["quota_reserved_tokens"] = cost
        for b in buckets:
            if b.tpm and cost > b.tpm:
                self.metrics.rejected.labels("request_too_large").inc()
                raise ApiError(
                    429,
                    f"Request too large for '{ctx.model}' on tokens per min (TPM): Limit {b.tpm}, Requested {cost} "
                    "(prompt estimate + max_tokens). Lower max_tokens or the prompt size.",
                    code="rate_limit_exceeded",
                    headers={"retry-after": "60"},
                    reason="rate_limited",
                )
        lease = unique_id() if _needs_lease(buckets) else ""
        if self.remote is None:  # in-process limits: nothing to await
            limiter: MemoryLimiter | RedisLimiter = self.local
            decision = self.local.acquire(buckets, cost, lease)
        else:
            limiter, decision = await self._acquire(buckets, cost, lease)
        ctx.response_headers.extend(rate_limit_headers(buckets, decision.states))
        if not decision.allowed:
            self.metrics.rejected.labels(decision.reason or "requests").inc()
            wait = max(decision.retry_after, 0.001)
            what = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)"}.get(
                decision.reason or "", "concurrent requests"
            )
            raise ApiError(
                429,
                f"Rate limit reached for '{ctx.model}' on {what}. Please try again in {format_reset(wait)}.",
                code="rate_limit_exceeded",
                headers={
                    "retry-after": str(max(math.ceil(wait), 1)),
                    "retry-after-ms": str(math.ceil(wait * 1000)),
                },
                reason="rate_limited",
            )
        return QuotaTicket(self, limiter, buckets, cost, lease)

    def reservation(self, ctx: RequestContext) -> int:
        """Tokens reserved at admission: prompt estimate + max_tokens (or the default) per choice."""
        body = ctx.body or {}
        msgs = body.get("messages")
        spec = ROUTES_BY_NAME.get(ctx.route)
        if spec is not None and not spec.counts_tokens:
            return 0  # tokenize/detokenize, reading a stored response: authorized and rate-limited, never charged
        prompt = estimate_prompt_tokens(
            ctx.prompt_chars, len(msgs) if isinstance(msgs, list) else 0, self.settings
        )
        if spec is not None and not spec.reserves_completion:
            return prompt  # embeddings, score, rerank: the prompt is all there is
        completion = ctx.max_tokens if ctx.max_tokens is not None else self.settings.default_max_tokens
        n = body.get("n", 1)
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            completion *= n
        return prompt + completion

    # -- backends -------------------------------------------------------------------------------------------

    async def _acquire(
        self, buckets: tuple[Bucket, ...], cost: int, lease: str
    ) -> tuple[MemoryLimiter | RedisLimiter, Decision]:
        """Acquire from the shared backend (admit() calls the in-process limiter itself when there is none),
        or from the local fallback while it is down."""
        remote = self.remote
        assert remote is not None
        if time.monotonic() >= self._down_until:
            try:
                decision = await remote.acquire(buckets, cost, lease)
            except BACKEND_ERRORS as e:
                self.backend_failed(e)
            else:
                # The local fallback starts from the shared state, split among replicas (quota/fallback.py).
                mirror(self.local, buckets, decision)
                if self.replicas is None:
                    self.replicas = ReplicaCount(remote.client, self.settings.key_prefix)
                    self.replicas.start()
                if self._down:
                    self._down = False
                    self.metrics.backend_up.labels(remote.backend).set(1)
                    log.warning("quota backend %s is reachable again; shared limits restored", remote.backend)
                    if self._deferred and (self._replay is None or self._replay.done()):
                        self._replay = asyncio.create_task(self._replay_deferred())
                return remote, decision
        mode = self.settings.on_backend_error
        self.metrics.backend_errors.labels(remote.backend, mode).inc()
        if mode == "closed":
            self.metrics.rejected.labels("backend_unavailable").inc()
            raise ApiError(
                503,
                "The quota service is unavailable; retry shortly.",
                code="quota_backend_unavailable",
                headers={"retry-after": str(max(math.ceil(self.settings.redis_retry_interval), 1))},
                reason="quota_unavailable",
            )
        n = self.replicas.count if self.replicas is not None else 1
        return self.local, self.local.acquire(share(buckets, n), cost, lease)

    def backend_failed(self, e: BaseException, settle: bool = False) -> None:
        assert self.remote is not None
        now = time.monotonic()
        self._down_until = now + self.settings.redis_retry_interval
        first = not self._down
        if first:
            self._down = True
            self.metrics.backend_up.labels(self.remote.backend).set(0)
        if first or now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            action = (
                "enforcing local per-replica limits (fail open)"
                if self.settings.on_backend_error == "open"
                else "refusing requests with 503 (fail closed)"
            )
            log.error(
                "quota backend %s unreachable (%s: %s)%s; %s",
                self.remote.backend,
                type(e).__name__,
                str(e)[:200],
                " while settling" if settle else "",
                action,
                extra={"quota_backend": self.remote.backend, "quota_mode": self.settings.on_backend_error},
            )

    def defer_settlement(self, buckets: tuple[Bucket, ...], lease: str, delta: int) -> None:
        """Keep a settlement Redis did not take (token correction, concurrency slot) to replay on recovery."""
        if delta or lease:
            self._deferred.append((buckets, lease, delta))

    async def _replay_deferred(self) -> None:
        assert self.remote is not None
        done = 0
        while self._deferred:
            buckets, lease, delta = self._deferred[0]
            try:
                await self.remote.release(buckets, lease, delta)
            except BACKEND_ERRORS as e:
                self.backend_failed(e, settle=True)
                break
            self._deferred.popleft()
            done += 1
        if done:
            log.warning("replayed %d quota settlements deferred while the backend was down", done)

    async def close(self) -> None:
        if self._replay is not None and not self._replay.done():
            self._replay.cancel()
        if self.replicas is not None:
            await self.replicas.stop()
        if self.remote is not None:
            await self.remote.close()
