"""AuditWriter: the Observer that writes one record per request, and AuditGate: its back-pressure.

Hot path cost: ``on_request_end`` only puts the finished RequestContext on a bounded queue (audit/queue.py)
(``put_nowait``). The record is built, redacted/hashed, chained and written by one writer task.

Durability window (documented, tested by kill -9 in tests/integration/test_audit_gateway.py):

- a record reaches the kernel (``os.write``; it then survives ``kill -9`` of the gateway) as soon as the
  writer task gets to it: right after its request ended plus ``write_delay`` plus the backlog ahead of it
  (``queue_depth()``, exported as a metric);
- it is on disk (survives power loss / a kernel crash) at most ``fsync_interval`` seconds after that: the
  writer fsyncs at most once per interval while there are unsynced writes (batched fsync, in a thread so
  the event loop does not stall).

Back-pressure, never silent drops: when the queue is full,

- the observer call of the finishing request waits for room (``await queue.put``): its record is kept;
- new requests are held at admission (AuditGate wraps the configured Admission, so they are stopped
  before any engine work is done): ``on_full: block`` makes them wait until the writer caught up (503 after
  ``block_timeout``), ``on_full: reject`` answers 503 ``audit_backpressure`` at once. Their own records are
  written too. A request that got past admission still completes and is recorded.

The gate is an Admission wrapper rather than a hook in the proxy so that nothing in the hot path changes
when audit is off, and it runs after authentication: an unauthenticated flood is not an admission
concern (it is still recorded, with the observer waiting for room).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from gateway.audit.archive import Archiver
from gateway.audit.config import AuditSettings
from gateway.audit.queue import RecordQueue
from gateway.audit.record import build_record
from gateway.audit.redact import Redactor
from gateway.audit.sink import AuditSink, build_sink
from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.hooks import Admission, Ticket

log = logging.getLogger("gateway.audit")

_STOP = object()
_NOTHING = object()  # what get_within returns when no record came in time
_MAX_BATCH = 512


@dataclass(frozen=True, slots=True)
class AuditSnapshot:
    """The writer's state for telemetry (gateway/metrics/ exports it)."""

    queue_depth: int  # records accepted, not yet written
    queue_capacity: int
    records_written: int
    write_errors: int  # failed writes and fsyncs (retried; records are kept)
    backpressure: int  # new requests held or refused by the gate while the queue was full
    full_waits: int  # observer calls that found the queue full and waited for room
    fsyncs: int


class AuditWriter:
    """Observer: one record per request via a bounded queue and a writer task (start()/stop() in lifespan)."""

    def __init__(
        self, settings: AuditSettings, *, sink: AuditSink | None = None, archiver: Archiver | None = None
    ) -> None:
        self.settings = settings
        self.redactor = (
            Redactor.from_settings(settings.redaction_patterns) if settings.content == "redacted" else None
        )
        self.archiver = archiver
        self.sink = sink if sink is not None else build_sink(settings)
        if self.sink.on_closed is None:
            self.sink.on_closed = self._closed
        self.queue = RecordQueue(settings.queue_size)
        self._room = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._archive_q: asyncio.Queue[str | None] = asyncio.Queue()
        self._archive_task: asyncio.Task[None] | None = None
        # Counters (exported through stats()).
        self.records_written = 0
        self.full_waits = 0  # observer calls that found the queue full and waited
        self.rejected = 0  # requests refused/held by the gate
        self.fsyncs = 0
        self.last_fsync = 0.0
        self.write_errors = 0

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> AuditWriter:
        archiver = Archiver.from_env(settings) if settings.archive_bucket else None
        return cls(settings, archiver=archiver)

    # -- Observer -------------------------------------------------------------------------------------------

    async def on_request_end(self, ctx: RequestContext) -> None:
        try:
            self.queue.put_nowait(ctx)
        except asyncio.QueueFull:
            self.full_waits += 1
            await self.queue.put(ctx)

    def queue_depth(self) -> int:
        return self.queue.qsize()

    def stats(self) -> AuditSnapshot:
        return AuditSnapshot(
            queue_depth=self.queue.qsize(),
            queue_capacity=self.queue.maxsize,
            records_written=self.records_written,
            write_errors=self.write_errors,
            backpressure=self.rejected,
            full_waits=self.full_waits,
            fsyncs=self.fsyncs,
        )

    def is_full(self) -> bool:
        return self.queue.full()

    async def wait_for_room(self, timeout: float | None) -> bool:
        """Wait until the queue is not full; False when ``timeout`` (seconds, None = forever) passed first."""
        deadline = None if not timeout else time.monotonic() + timeout
        while self.queue.full():
            ev = self._room
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await ev.wait()
            except TimeoutError:
                return not self.queue.full()
        return True

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.archiver is not None:
            self._archive_task = asyncio.get_running_loop().create_task(
                self._archive_loop(), name="audit-archive"
            )
        await self.sink.open()
        if self.archiver is not None:
            for p in self.sink.closed_segments():
                self._closed(p)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-writer")
        self._task.add_done_callback(_log_crash)

    async def stop(self, timeout: float = 30.0) -> None:
        """Write everything queued, close the segment (so it can be archived) and finish pending uploads."""
        if self._task is not None:
            try:
                async with asyncio.timeout(timeout):
                    if not self._task.done():
                        await self.queue.put(_STOP)
                    await asyncio.shield(self._task)
            except TimeoutError:
                log.error("audit: writer did not drain in time", extra={"queued": self.queue.qsize()})
                self._task.cancel()
            except Exception:
                pass  # logged by _log_crash
            self._task = None
            await self.sink.close()
        if self._archive_task is not None:
            await self._archive_q.put(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._archive_task), timeout)
            except TimeoutError:
                log.error("audit: archive uploads still pending at shutdown; they resume at the next start")
                self._archive_task.cancel()
            self._archive_task = None

    # -- the writer task ------------------------------------------------------------------------------------

    def _next_timeout(self, dirty: bool) -> float | None:
        t = None
        if dirty:
            t = max(0.0, self.last_fsync + self.settings.fsync_interval - time.monotonic())
        due = self.sink.rotate_due_in()
        if due is not None:
            t = max(0.0, due) if t is None else min(t, max(0.0, due))
        return t

    async def _run(self) -> None:
        q = self.queue
        dirty = False
        stopping = False
        content = self.settings.content
        redactor = self.redactor
        self.last_fsync = time.monotonic()
        while not stopping:
            batch: list[Any] = []
            # Callers wait for room only while the queue is full (wait_for_room): they are woken below then.
            was_full = q.full()
            if not q.empty():  # records waiting: no timer to arm, no wait
                batch.append(q.get_nowait())
            else:
                first = await q.get_within(self._next_timeout(dirty), _NOTHING)
                if first is not _NOTHING:
                    batch.append(first)
            if batch and self.settings.write_delay > 0 and batch[0] is not _STOP:
                await asyncio.sleep(self.settings.write_delay)
            was_full = was_full or q.full()
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(q.get_nowait())
                except asyncio.QueueEmpty:
                    break
            if batch and was_full:
                room, self._room = self._room, asyncio.Event()
                room.set()
            if batch and batch[-1] is _STOP or _STOP in batch:
                stopping = True
                batch = [b for b in batch if b is not _STOP]
            if batch:
                recs = []
                for ctx in batch:
                    try:
                        recs.append(build_record(ctx, content, redactor))
                    except Exception:  # a record must never be lost to a bug in one field
                        log.exception("audit: building a record failed; writing a minimal one")
                        recs.append(_minimal_record(ctx))
                await self._write(recs)
                dirty = True
            if dirty and (stopping or time.monotonic() - self.last_fsync >= self.settings.fsync_interval):
                await self._sync()
                dirty = False
            try:
                await self.sink.maybe_rotate()
            except OSError:
                log.exception("audit: rotation failed; retrying in 1 s")
                await asyncio.sleep(1.0)  # no busy loop on a broken disk; the queue applies back-pressure
        if dirty:
            await self._sync()

    async def _write(self, recs: list[dict[str, Any]]) -> None:
        delay = 0.1
        while True:
            try:
                await self.sink.write(recs)
                self.records_written += len(recs)
                return
            except OSError as e:  # disk full, EIO: keep the records, retry; the queue applies back-pressure
                self.write_errors += 1
                log.error("audit: write failed (%s); retrying", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _sync(self) -> None:
        try:
            await self.sink.sync()
            self.fsyncs += 1
        except OSError as e:
            self.write_errors += 1
            log.error("audit: fsync failed (%s)", e)
        self.last_fsync = time.monotonic()

    # -- archiving ------------------------------------------------------------------------------------------

    def _closed(self, path: str) -> None:
        if self.archiver is not None:
            self._archive_q.put_nowait(path)

    async def _archive_loop(self) -> None:
        assert self.archiver is not None
        while True:
            path = await self._archive_q.get()
            if path is None:
                return
            delay = 1.0
            for _attempt in range(5):
                try:
                    await asyncio.to_thread(self.archiver.archive, path)
                    break
                except Exception as e:
                    log.error("audit: archiving %s failed (%s); kept locally", path, e)
                    await asyncio.sleep(delay)
                    delay *= 2


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Records stay queued; the full queue then holds/refuses new requests (never a silent drop).
        log.error("audit: the writer task died", exc_info=task.exception())


def _minimal_record(ctx: RequestContext) -> dict[str, Any]:
    from gateway.audit.record import iso_utc

    return {
        "@timestamp": iso_utc(ctx.started_wall),
        "event": {"kind": "event", "action": ctx.route, "id": ctx.request_id},
        "http": {
            "request": {"id": ctx.client_request_id or ctx.request_id},
            "response": {"status_code": ctx.status},
        },
        "llm": {"decision": ctx.decision, "reason": ctx.reason, "model": ctx.model},
    }


class AuditGate:
    """Admission wrapper: holds (``block``) or refuses (``reject``) new requests while the audit queue is full."""

    def __init__(self, inner: Admission, writer: AuditWriter) -> None:
        self.inner = inner
        self.writer = writer
        self.mode = writer.settings.on_full
        self.block_timeout = writer.settings.block_timeout

    async def admit(self, ctx: RequestContext) -> Ticket:
        w = self.writer
        if w.is_full():
            w.rejected += 1
            if self.mode == "reject" or not await w.wait_for_room(self.block_timeout or None):
                raise ApiError(
                    503,
                    "The audit log is backlogged; retry shortly.",
                    code="audit_backpressure",
                    headers={"retry-after": "1"},
                    reason="audit_backpressure",
                )
        return await self.inner.admit(ctx)
