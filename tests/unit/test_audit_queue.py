"""The audit writer's bounded queue (gateway/audit/queue.py): asyncio.Queue's meaning for what the writer uses."""

from __future__ import annotations

import asyncio

import pytest

from gateway.audit.queue import RecordQueue


async def test_fifo_bounds_and_nowait_errors() -> None:
    q = RecordQueue(2)
    assert q.empty() and not q.full() and q.qsize() == 0
    q.put_nowait("a")
    q.put_nowait("b")
    assert q.full() and q.qsize() == 2
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait("c")
    assert [q.get_nowait(), q.get_nowait()] == ["a", "b"]
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()
    unbounded = RecordQueue(0)
    for i in range(1000):
        unbounded.put_nowait(i)
    assert not unbounded.full() and unbounded.qsize() == 1000


async def test_put_waits_for_room_and_get_for_an_item_in_arrival_order() -> None:
    q = RecordQueue(1)
    q.put_nowait(0)
    putters = [asyncio.create_task(q.put(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    assert not any(t.done() for t in putters)
    got = []
    for _ in range(4):
        got.append(await q.get())
        await asyncio.sleep(0)
    assert got == [0, 1, 2, 3] and all(t.done() for t in putters)
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    assert not getter.done()
    q.put_nowait("late")
    assert await getter == "late"


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    q = RecordQueue(1)
    q.put_nowait("x")
    first = asyncio.create_task(q.put("first"))
    second = asyncio.create_task(q.put("second"))
    await asyncio.sleep(0)
    assert q.get_nowait() == "x"  # wakes the first putter ...
    first.cancel()  # ... which is cancelled before it runs: the second must get the room
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert first.cancelled() and second.done()
    assert q.get_nowait() == "second" and q.empty()
    g1 = asyncio.create_task(q.get())
    g2 = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait("y")
    g1.cancel()
    assert await g2 == "y"


async def test_get_within_returns_the_default_when_nothing_came_in_time() -> None:
    q = RecordQueue(4)
    nothing = object()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await q.get_within(0.05, nothing) is nothing
    assert loop.time() - t0 >= 0.04
    assert await q.get_within(0, nothing) is nothing  # no wait at all
    q.put_nowait("ready")
    assert await q.get_within(5, nothing) == "ready"
    waiting = asyncio.create_task(q.get_within(5, nothing))
    await asyncio.sleep(0.01)
    q.put_nowait("later")
    assert await waiting == "later"
    # An expired wait leaves nothing behind that would swallow the next wake-up.
    assert await q.get_within(0.01, nothing) is nothing
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait("next")
    assert await asyncio.wait_for(getter, 1) == "next"
