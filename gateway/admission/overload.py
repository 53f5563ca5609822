"""Overload protection in front of the engines: a short, bounded wait instead of piling onto full queues.

A model is overloaded when every healthy replica reports (through the health checker's scrape of
``vllm:num_requests_waiting``) a queue above the threshold. Then a request waits, up to ``max_wait``, for
any replica to drop back; at most ``max_queued`` requests per model wait at once. Past either bound: 503
with Retry-After. Readings older than ``metrics_max_age`` are not trusted (a replica that cannot be scraped
is judged by its health alone), so a broken scrape never blocks traffic.
"""

from __future__ import annotations

import asyncio
import time

from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.hooks import Ticket
from gateway.quota.config import OverloadSettings
from gateway.quota.metrics import QuotaMetrics
from gateway.routing.pool import EndpointPool


class OverloadGuard:
    """The admission chain's last step: waits (bounded) while every healthy replica's queue is long."""

    name = "overload"

    def __init__(
        self, settings: OverloadSettings, pools: dict[str, EndpointPool], metrics: QuotaMetrics | None = None
    ) -> None:
        self.settings = settings
        self.pools = pools
        self.metrics = metrics
        self.waiting: dict[str, int] = {}

    def overloaded(self, model: str) -> bool:
        pool = self.pools.get(model)
        if pool is None:
            return False
        threshold = self.settings.queue_threshold
        oldest = time.time() - self.settings.metrics_max_age
        seen = False
        for ep in pool.endpoints:
            if not ep.healthy:
                continue
            if ep.metrics_at < oldest or ep.engine_waiting <= threshold:
                return False
            seen = True
        return seen

    def _refuse(self, model: str, why: str, message: str) -> ApiError:
        if self.metrics is not None:
            self.metrics.rejected.labels(why).inc()
        return ApiError(
            503,
            message,
            code="engine_overloaded",
            headers={"retry-after": str(self.settings.retry_after)},
            reason="overloaded",
        )

    async def admit(self, ctx: RequestContext) -> Ticket | None:
        if ctx.model is not None:
            await self.wait(ctx.model)
        return None

    async def wait(self, model: str) -> None:
        """Returns once the model can take the request; raises a 503 ApiError when it cannot in time."""
        if not self.overloaded(model):
            return
        s = self.settings
        n = self.waiting.get(model, 0)
        if n >= s.max_queued:
            raise self._refuse(
                model,
                "queue_full",
                f"The model '{model}' is overloaded and its admission queue is full; retry later.",
            )
        self.waiting[model] = n + 1
        m = self.metrics
        if m is not None:
            m.queue_depth.labels(model).inc()
        deadline = time.monotonic() + s.max_wait
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.sleep(min(s.poll_interval, left))
                if not self.overloaded(model):
                    if m is not None:
                        m.queued.labels("admitted").inc()
                    return
        finally:
            self.waiting[model] -= 1
            if m is not None:
                m.queue_depth.labels(model).dec()
        if m is not None:
            m.queued.labels("timed_out").inc()
        raise self._refuse(model, "overloaded", f"The model '{model}' is overloaded; retry later.")
