"""A background round that repeats every ``interval`` seconds (health probes, DNS discovery)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("gateway.routing")


class PeriodicTask:
    """Runs ``round_fn`` once at ``start`` (so state is fresh before traffic), then every ``interval`` seconds
    until ``stop``. A failing round is logged and never ends the loop."""

    def __init__(self, round_fn: Callable[[], Awaitable[None]], interval: float, what: str) -> None:
        self.round_fn = round_fn
        self.interval = interval
        self.what = what
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.round_fn()
            except Exception:  # pragma: no cover - never let the loop die
                log.exception("%s round failed", self.what)

    async def start(self) -> None:
        await self.round_fn()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
