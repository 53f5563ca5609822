"""Where sealed audit lines go: the two implementations of ``AuditSink`` (declared in gateway/hooks.py),
chosen by ``audit.sink`` through ``SINKS``: stdout, or a rotating segment file (with torn-line recovery at
start).

``write`` is a coroutine so that a sink that talks to a network (a log service, object storage) awaits its
I/O instead of blocking the event loop. The built-in sinks write to the kernel (page cache) inline, which
does not wait for a disk, and fsync in a thread.

File layout (``path = /var/log/llm-gateway/audit.jsonl``)::

    audit.jsonl                                 the active segment (appended to, O_APPEND)
    audit.20261129T104724.123456Z-1f2e3d4c5b6a7988.jsonl  closed segments (renamed at rotation; archived, then removed)
    audit.jsonl.torn-20261129T110000Z           bytes of a torn last line found at start (kept for forensics)

Rotation closes the active segment with a footer record, fsyncs it, renames it, fsyncs the directory and
opens a new segment whose header anchors to the footer's hash. A restart after a crash continues the active
segment: an incomplete last line (no newline: the process died inside a write) is cut off, saved to a
``.torn-*`` file, and a ``audit-recovery`` record noting its size and sha256 is appended to the chain.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from mypy_extensions import mypyc_attr

from gateway.audit.chain import FOOTER, GENESIS, HEADER, RECOVERY, Chain, line_hash, new_segment_id
from gateway.audit.config import AuditSettings
from gateway.audit.record import ECS_VERSION, iso_utc
from gateway.hooks import AuditSink

log = logging.getLogger("gateway.audit")

_TAIL_READ = 1 << 20  # the last complete line is looked for in the file's last MiB


def _control_record(action: str, message: str, **audit: Any) -> dict[str, Any]:
    now = time.time()
    rec: dict[str, Any] = {
        "@timestamp": iso_utc(now),
        "ecs": {"version": ECS_VERSION},
        "event": {"kind": "state", "category": ["configuration"], "type": ["info"], "action": action},
        "host": {"hostname": socket.gethostname()},
        "message": message,
    }
    if audit:
        rec["audit_meta"] = audit
    return rec


class StdoutSink:
    """Records on standard output (a log shipper picks them up). One chained segment per process."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self.chain = Chain(new_segment_id())
        self.bytes_written = 0
        self.on_closed: Callable[[str], None] | None = None

    async def open(self) -> None:
        rec = _control_record(HEADER, "audit segment start")
        self._write([self.chain.seal(_with_header(rec, None))])

    async def write(self, records: Sequence[dict[str, Any]]) -> None:
        self._write([self.chain.seal(r) for r in records])

    def _write(self, lines: list[bytes]) -> None:
        _write_all(self.fd, b"".join(line + b"\n" for line in lines))

    async def sync(self) -> None:
        return None

    async def maybe_rotate(self) -> None:
        return None

    def rotate_due_in(self) -> float | None:
        return None

    def closed_segments(self) -> list[str]:
        return []

    async def close(self) -> None:
        return None


def _with_header(rec: dict[str, Any], previous_segment: str | None) -> dict[str, Any]:
    rec["audit_meta"] = {"previous_segment": previous_segment}
    return rec


def _write_all(fd: int, buf: bytes) -> None:
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def set_torn_aside(path: str, torn: bytes, keep: int, what: str, **extra: Any) -> str:
    """Move a torn last line (a write cut short by a crash) out of segment ``path``: its bytes are kept in
    ``<path>.torn-<time>`` (fsynced, for forensics) and the file is cut to its first ``keep`` bytes.
    Returns the torn file's path."""
    torn_path = f"{path}.torn-{_stamp(time.time())}"
    with open(torn_path, "wb") as tf:
        tf.write(torn)
        tf.flush()
        os.fsync(tf.fileno())
    os.truncate(path, keep)
    log.warning(
        "audit: torn last line cut off %s",
        what,
        extra={"torn_bytes": len(torn), "torn_file": torn_path, **extra},
    )
    return torn_path


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp(ts: float) -> str:
    """UTC, to the microsecond, so that closed segments sort in the order they were written."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(ts)) + f".{int(ts * 1e6) % 1000000:06d}Z"


# A sink is a place to extend (a test's fault injection, a site's own sink): Python subclasses allowed.
@mypyc_attr(allow_interpreted_subclasses=True)
class FileSink:
    """The active segment file plus rotation by size/age. ``on_closed(path)`` gets each closed segment."""

    def __init__(
        self,
        path: str,
        rotate_bytes: int = 0,
        rotate_seconds: float = 0.0,
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.path = os.path.abspath(path)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.on_closed = on_closed
        self.fd: int | None = None
        self.chain: Chain | None = None
        self.size = 0
        self.opened_at = 0.0
        self.bytes_written = 0
        base, ext = os.path.splitext(self.path)
        self._base, self._ext = base, ext or ".jsonl"

    # -- naming ---------------------------------------------------------------------------------------------

    def closed_name(self, started: float, segment: str) -> str:
        return f"{self._base}.{_stamp(started)}-{segment}{self._ext}"

    def closed_segments(self) -> list[str]:
        """Closed segments left in the directory (oldest first), e.g. not yet archived."""
        pat = glob.escape(self._base) + ".*" + glob.escape(self._ext)
        return sorted(p for p in glob.glob(pat) if p != self.path)

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def open(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            await asyncio.to_thread(self._recover)
        else:
            self._start_segment(None, GENESIS)

    def _start_segment(self, previous: str | None, anchor: str) -> None:
        self.chain = Chain(new_segment_id(), 0, anchor)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self.size = os.fstat(self.fd).st_size
        self.opened_at = time.time()
        rec = _with_header(_control_record(HEADER, "audit segment start"), previous)
        rec["audit_meta"]["started"] = self.opened_at
        self._write_lines([self.chain.seal(rec)])
        os.fsync(self.fd)
        _fsync_dir(self.path)

    def _recover(self) -> None:
        """Continue the active segment left by a previous process, cutting off a torn last line."""
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            start = max(0, size - _TAIL_READ)
            f.seek(start)
            tail = f.read()
        cut = tail.rfind(b"\n")
        torn = tail[cut + 1 :] if cut >= 0 else (tail if start == 0 else b"")
        good_end = start + cut + 1 if cut >= 0 else 0
        body = tail[:cut] if cut >= 0 else b""
        last = body[body.rfind(b"\n") + 1 :] if body else b""
        head = self._read_header()
        state = _chain_state(last)
        if torn:
            torn_path = set_torn_aside(self.path, torn, good_end, "the active segment")
        if head is None and good_end == 0:
            os.remove(self.path)  # nothing but a torn line: start over (the torn bytes are kept aside)
            self._start_segment(None, GENESIS)
            if torn:
                self._write_recovery(torn, torn_path)
            return
        if state is None or head is None or state[3] == FOOTER:
            # Nothing to continue (a closed but not yet renamed segment, or an unreadable file): close it as is.
            seg = (state[0] if state else None) or (head or {}).get("segment") or new_segment_id()
            started = (head or {}).get("started") or os.path.getmtime(self.path)
            dst = self.closed_name(started, seg)
            os.replace(self.path, dst)
            _fsync_dir(self.path)
            if self.on_closed is not None:
                self.on_closed(dst)
            self._start_segment(seg, line_hash(last) if last else GENESIS)
            if torn:
                self._write_recovery(torn, torn_path)
            return
        segment, seq, prev, _ = state
        self.chain = Chain(segment, seq, prev)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = os.fstat(self.fd).st_size
        self.opened_at = head.get("started") or time.time()
        if torn:
            self._write_recovery(torn, torn_path)
        else:
            rec = _control_record(RECOVERY, "audit writer restarted; segment continued", clean=True)
            self._write_lines([self.chain.seal(rec)])
        os.fsync(self.fd)

    def _write_recovery(self, torn: bytes, torn_path: str) -> None:
        rec = _control_record(
            RECOVERY,
            "torn last line found at start (the previous process died while writing); moved aside",
            torn_bytes=len(torn),
            torn_sha256=hashlib.sha256(torn).hexdigest(),
            torn_file=os.path.basename(torn_path),
        )
        rec["event"]["type"] = ["error"]
        self._write_lines([self.chain.seal(rec)])  # type: ignore[union-attr]
        os.fsync(self.fd)  # type: ignore[arg-type]

    def _read_header(self) -> dict[str, Any] | None:
        with open(self.path, "rb") as f:
            first = f.readline()
        try:
            obj = json.loads(first)
            a, meta = obj.get("audit", {}), obj.get("audit_meta", {})
            if obj.get("event", {}).get("action") != HEADER:
                return None
            return {"segment": a.get("segment"), "started": meta.get("started")}
        except (ValueError, AttributeError):
            return None

    # -- writing --------------------------------------------------------------------------------------------

    async def write(self, records: Sequence[dict[str, Any]]) -> None:
        assert self.chain is not None
        self._write_lines([self.chain.seal(r) for r in records])

    def _write_lines(self, lines: list[bytes]) -> None:
        buf = b"".join(line + b"\n" for line in lines)
        _write_all(self.fd, buf)  # type: ignore[arg-type]
        self.size += len(buf)
        self.bytes_written += len(buf)

    async def sync(self) -> None:
        if self.fd is not None:
            await asyncio.to_thread(os.fsync, self.fd)

    def rotate_due_in(self) -> float | None:
        if not self.rotate_seconds or self.fd is None:
            return None
        return self.opened_at + self.rotate_seconds - time.time()

    async def maybe_rotate(self) -> None:
        due = self.rotate_due_in()
        if (self.rotate_bytes and self.size >= self.rotate_bytes) or (due is not None and due <= 0):
            await self.rotate()

    async def rotate(self) -> str:
        """Close the active segment (footer, fsync, rename) and start the next; returns the closed path."""
        assert self.chain is not None and self.fd is not None
        chain = self.chain
        dst = await self._seal_segment("audit segment end")
        self._start_segment(chain.segment, chain.prev)
        if self.on_closed is not None:
            self.on_closed(dst)
        return dst

    async def _seal_segment(self, message: str) -> str:
        """Write the footer, fsync and close the active file, rename it to its closed name; returns that name."""
        assert self.chain is not None and self.fd is not None
        chain = self.chain
        rec = _control_record(FOOTER, message, records=chain.seq - 1)
        self._write_lines([chain.seal(rec)])
        fd, self.fd = self.fd, None
        await asyncio.to_thread(os.fsync, fd)
        os.close(fd)
        dst = self.closed_name(self.opened_at, chain.segment)
        os.replace(self.path, dst)
        await asyncio.to_thread(_fsync_dir, self.path)
        return dst

    async def close(self, *, rotate: bool = True) -> None:
        """At shutdown: close the active segment so it can be archived (``rotate``) or just fsync it."""
        if self.fd is None:
            return
        if rotate and self.chain is not None and self.chain.seq > 1:
            dst = await self._seal_segment("audit segment end (shutdown)")
            if self.on_closed is not None:
                self.on_closed(dst)
            return
        fd, self.fd = self.fd, None
        await asyncio.to_thread(os.fsync, fd)
        os.close(fd)


def _chain_state(last: bytes) -> tuple[str, int, str, str | None] | None:
    """(segment, next seq, hash of the line, its event.action) from the last complete line, if chained."""
    if not last:
        return None
    try:
        obj = json.loads(last)
        a = obj["audit"]
        return a["segment"], int(a["seq"]) + 1, line_hash(last), (obj.get("event") or {}).get("action")
    except (ValueError, KeyError, TypeError):
        return None


def _file_sink(settings: AuditSettings) -> AuditSink:
    return FileSink(settings.path, settings.rotate_bytes, settings.rotate_seconds)


def _stdout_sink(settings: AuditSettings) -> AuditSink:
    return StdoutSink()


# The sinks ``audit.sink`` may name.
SINKS: dict[str, Callable[[AuditSettings], AuditSink]] = {"file": _file_sink, "stdout": _stdout_sink}


def build_sink(settings: AuditSettings) -> AuditSink:
    return SINKS[settings.sink](settings)
