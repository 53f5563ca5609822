"""Several gateway workers, one audit directory: each worker's files, and the adoption of dead workers' files.

With ``workers > 1`` every worker writes its own hash-chained segments at ``audit.path`` with ``{pid}``
replaced by its process id (``audit.{pid}.jsonl`` → ``audit.4711.jsonl``). A worker killed with ``kill -9``
leaves its active segment behind (perhaps with a torn last line), and its closed segments not yet archived;
the worker that replaces it has another pid and would never look at them. So, at start, each worker

1. takes its own lock file (``audit.4711.jsonl.lock``, an exclusive ``flock`` held for the life of the
   process: the kernel drops it when the process dies, however it dies);
2. adopts the files of every other pid whose lock it can take (no live worker holds it): the active segment
   gets its torn last line cut off and kept aside (``.torn-*``, as a restart does), an ``audit-recovery``
   record, a footer, fsync, and the closed name; then it and the dead worker's other closed segments are
   renamed into this worker's names (``audit.4711.<start>-<segment>.jsonl``) and handed to its archiver.
   The lock file is removed last.

Both steps run under one directory lock (``.audit-workers.lock`` next to the files), so a worker creating
its lock and a worker adopting that pid's files never interleave, and two live workers never touch one
segment. A pid reused by a new worker is its own: it continues that segment as a restart would.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.audit.chain import FOOTER, HEADER, RECOVERY, Chain, line_hash
from gateway.audit.sink import FileSink, _control_record, _fsync_dir, _write_all, set_torn_aside

log = logging.getLogger("gateway.audit")

PID = "{pid}"
DIR_LOCK = ".audit-workers.lock"


def lock_path(active: str) -> str:
    return active + ".lock"


@contextlib.contextmanager
def _flock(path: str, blocking: bool = True) -> Iterator[int | None]:
    """An exclusive flock on ``path`` (created if missing); yields the fd, or None when not blocking and busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


@dataclass
class Adopted:
    """What one start found of dead workers: segments sealed here, and closed segments to archive."""

    pids: list[int] = field(default_factory=list)
    sealed: list[str] = field(default_factory=list)  # active segments closed here (their original names)
    closed: list[str] = field(
        default_factory=list
    )  # every closed segment taken over, under this worker's name


class WorkerFiles:
    """The ``{pid}`` audit path of this worker: its lifetime lock, and adoption of dead workers' files."""

    def __init__(self, template: str, pid: int | None = None) -> None:
        if PID not in template:
            raise ValueError("audit path template must contain {pid}")
        self.template = os.path.abspath(template)
        self.pid = os.getpid() if pid is None else pid
        self.path = self.template.replace(PID, str(self.pid))
        prefix, _, _ = self.template.partition(PID)
        self.root = os.path.dirname(prefix) or "/"
        self._lock_fd: int | None = None
        self._base = os.path.splitext(self.path)[0]
        head, tail = self.template.split(PID, 1)
        self._active_re = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\Z")

    # -- this worker ----------------------------------------------------------------------------------------

    def claim(self) -> None:
        """Take this worker's lock (held until release() or the end of the process)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        os.makedirs(self.root, exist_ok=True)
        with _flock(os.path.join(self.root, DIR_LOCK)):
            fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o640)
            try:
                # Adopters hold a pid's lock only under the directory lock, which we hold: busy means another
                # writer of this very process (two apps on one path), never a dead worker.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RuntimeError(
                    f"audit: {self.path} is already held by another writer in this process"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd

    def release(self) -> None:
        """At a clean stop (after the writer closed its segment): drop the lock and its file."""
        if self._lock_fd is None:
            return
        with _flock(os.path.join(self.root, DIR_LOCK)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path(self.path))
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the others -----------------------------------------------------------------------------------------

    def other_pids(self) -> list[int]:
        """Pids other than ours with an active segment, a lock file or closed segments in the directory."""
        pids: set[int] = set()
        star = glob.escape(self.template).replace(glob.escape(PID), "*")
        for p in glob.glob(star) + glob.glob(star + ".lock"):
            m = self._active_re.match(p[: -len(".lock")] if p.endswith(".lock") else p)
            if m:
                pids.add(int(m.group(1)))
        base, ext = os.path.splitext(self.template)
        ext = ext or ".jsonl"
        closed_re = re.compile(
            re.escape(base).replace(re.escape(PID), r"(\d+)") + r"\..+" + re.escape(ext) + r"\Z"
        )
        for p in glob.glob(glob.escape(base).replace(glob.escape(PID), "*") + ".*" + glob.escape(ext)):
            m = closed_re.match(p)
            if m and not self._active_re.match(p):
                pids.add(int(m.group(1)))
        pids.discard(self.pid)
        return sorted(pids)

    def adopt_dead(self) -> Adopted:
        """Seal and hand over the files of every pid no live worker holds (see the module docstring)."""
        out = Adopted()
        with _flock(os.path.join(self.root, DIR_LOCK)):
            for pid in self.other_pids():
                path = self.template.replace(PID, str(pid))
                with _flock(lock_path(path), blocking=False) as fd:
                    if fd is None:
                        continue  # a live worker holds it
                    sink = FileSink(path)
                    if os.path.exists(path):
                        try:
                            dst = seal_orphan(sink, pid)
                        except OSError as e:
                            log.error("audit: cannot adopt %s (%s); left in place", path, e)
                            continue
                        if dst is not None:
                            out.sealed.append(dst)
                    # Renamed into this worker's names: its archiver (and its next start) owns them now, and
                    # no other worker will pick them up again.
                    for p in sink.closed_segments():
                        mine = self._base + p[len(sink._base) :]
                        os.replace(p, mine)
                        out.closed.append(mine)
                    if out.closed:
                        _fsync_dir(self.path)
                    out.pids.append(pid)
                    os.unlink(lock_path(path))  # under the directory lock: nobody is creating it now
        if out.pids:
            log.warning(
                "audit: adopted the files of dead workers",
                extra={"pids": out.pids, "sealed": len(out.sealed), "closed": len(out.closed)},
            )
        return out


async def start_worker_audit(writer: Any, files: WorkerFiles) -> Callable[[], Awaitable[None]]:
    """Start an AuditWriter on this worker's ``{pid}`` path: claim it, start writing, adopt dead workers'
    files and queue their closed segments for the archive. Returns the closer that releases the claim
    (after the writer stopped)."""
    await asyncio.to_thread(files.claim)
    await writer.start()
    try:
        adopted = await asyncio.to_thread(files.adopt_dead)
    except OSError as e:  # never keeps the gateway from serving; the next start tries again
        log.error("audit: adopting dead workers' files failed (%s)", e)
        adopted = Adopted()
    for p in adopted.closed:
        writer._closed(p)  # archived when an archive bucket is configured

    async def release() -> None:
        files.release()

    return release


def seal_orphan(sink: FileSink, pid: int) -> str | None:
    """Close a dead worker's active segment: torn tail cut off and kept aside, recovery record, footer,
    fsync, closed name. Returns the closed path (None when the file held nothing to keep)."""
    path = sink.path
    with open(path, "rb") as f:
        data = f.read()
    cut = data.rfind(b"\n")
    good = data[: cut + 1] if cut >= 0 else b""
    torn = data[cut + 1 :]
    torn_path = None
    if torn:
        torn_path = set_torn_aside(path, torn, len(good), "a dead worker's segment", pid=pid)
    lines = good.split(b"\n")[:-1]
    if not lines:
        os.remove(path)  # only a torn header: nothing was recorded (the torn bytes are kept aside)
        return None
    head, last = _parse(lines[0]), _parse(lines[-1])
    started = os.path.getmtime(path)
    segment = None
    if head is not None and (head.get("event") or {}).get("action") == HEADER:
        started = (head.get("audit_meta") or {}).get("started") or started
        segment = (head.get("audit") or {}).get("segment")
    chained = last is not None and isinstance(last.get("audit"), dict)
    if last is not None and chained and (last.get("event") or {}).get("action") != FOOTER:
        a = last["audit"]
        try:
            chain = Chain(a["segment"], int(a["seq"]) + 1, line_hash(lines[-1]))
        except (KeyError, TypeError, ValueError):
            chain = None
        if chain is not None:
            segment = chain.segment
            recs = []
            if torn:
                rec = _control_record(
                    RECOVERY,
                    f"torn last line of dead worker pid {pid} moved aside at adoption",
                    torn_bytes=len(torn),
                    torn_sha256=hashlib.sha256(torn).hexdigest(),
                    torn_file=os.path.basename(torn_path or ""),
                    adopted_pid=pid,
                )
                rec["event"]["type"] = ["error"]
                recs.append(rec)
            else:
                recs.append(
                    _control_record(RECOVERY, f"segment of dead worker pid {pid} adopted", adopted_pid=pid)
                )
            lines_out = [chain.seal(r) for r in recs]
            footer = _control_record(
                FOOTER, "audit segment end (adopted from a dead worker)", records=chain.seq - 1
            )
            lines_out.append(chain.seal(footer))
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                _write_all(fd, b"".join(line + b"\n" for line in lines_out))
                os.fsync(fd)
            finally:
                os.close(fd)
    # A footer already there (closed, not yet renamed) or an unreadable file: closed as it is; verify says why.
    dst = sink.closed_name(started, segment or os.urandom(8).hex())
    os.replace(path, dst)
    _fsync_dir(path)
    return dst


def _parse(line: bytes) -> dict | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
