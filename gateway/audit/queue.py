"""The audit writer's bounded queue: the part of ``asyncio.Queue`` it uses, compiled with the request path.

Every request puts one finished context on it and the writer task takes them off in batches. ``asyncio.Queue``
is interpreted Python that also keeps an unfinished-task count and an Event nobody here joins on; this one is a
deque and two lists of waiting futures, with the same meaning: ``put_nowait`` raises ``asyncio.QueueFull``,
``get_nowait`` raises ``asyncio.QueueEmpty``, ``put`` waits for room and ``get`` for an item (both in arrival
order, and a cancelled waiter passes its turn on), ``maxsize`` 0 means unbounded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class RecordQueue:
    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize
        self._items: deque[Any] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def put_nowait(self, item: Any) -> None:
        if 0 < self.maxsize <= len(self._items):
            raise asyncio.QueueFull
        self._items.append(item)
        if self._getters:
            _wake_one(self._getters)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if self._putters:
            _wake_one(self._putters)
        return item

    async def put(self, item: Any) -> None:
        while self.full():
            await self._wait(self._putters, None)
        self.put_nowait(item)

    async def get(self) -> Any:
        while not self._items:
            await self._wait(self._getters, None)
        return self.get_nowait()

    async def get_within(self, timeout: float | None, default: Any = None) -> Any:
        """:meth:`get`, or ``default`` when nothing came within ``timeout`` seconds (None: no limit). One timer
        handle, not an ``asyncio.timeout`` context per wait."""
        if timeout is None:
            return await self.get()
        if not self._items and timeout > 0:
            await self._wait(self._getters, timeout)
        return self.get_nowait() if self._items else default

    async def _wait(self, waiters: deque[asyncio.Future[None]], timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        waiters.append(fut)
        timer = loop.call_later(timeout, _expire, fut) if timeout is not None else None
        try:
            await fut
        except BaseException:
            fut.cancel()
            try:
                waiters.remove(fut)
            except ValueError:
                pass  # already taken off by a wake-up
            # Cancelled (perhaps just after being woken): pass the turn on while there is something to take.
            if self._items if waiters is self._getters else not self.full():
                _wake_one(waiters)
            raise
        finally:
            if timer is not None:
                timer.cancel()


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)  # stays in its deque, done: wake-ups skip it


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        w = waiters.popleft()
        if not w.done():
            w.set_result(None)
            return
