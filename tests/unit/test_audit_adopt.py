"""Adoption of dead workers' audit files (gateway/audit/adopt.py): torn lines repaired, segments sealed and
renamed into the adopter's names, live workers' files never touched, the chain verifies."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from gateway.audit.adopt import DIR_LOCK, WorkerFiles, lock_path, start_worker_audit
from gateway.audit.chain import FOOTER, RECOVERY, main_verify, verify
from gateway.audit.config import AuditSettings
from gateway.audit.sink import FileSink
from gateway.audit.writer import AuditWriter
from gateway.outcome import Outcome

TORN = b'{"@timestamp":"2026-12-01T00:00:00.000Z","event":{"kind":"event","id":"torn'


def _rec(i: int) -> dict:
    return {"event": {"kind": "event", "id": f"r{i}", "action": "/v1/completions"}}


def dead_worker(template: str, pid: int, records: int = 3, rotate_first: bool = False) -> str:
    """Files a worker killed with -9 leaves: an open active segment (and, optionally, a closed one)."""
    path = template.replace("{pid}", str(pid))

    async def run() -> None:
        s = FileSink(path)
        await s.open()
        if rotate_first:
            await s.write([_rec(100)])
            await s.rotate()
        await s.write([_rec(i) for i in range(records)])
        os.close(s.fd)  # no footer, no rename: what kill -9 leaves

    asyncio.run(run())
    # a lock file as the dead worker held it (the kernel dropped its flock)
    Path(lock_path(path)).touch()
    return path


def _actions(path: Path) -> list[str]:
    return [json.loads(x)["event"]["action"] for x in path.read_bytes().splitlines()]


def test_dead_workers_segment_is_repaired_sealed_and_taken_over(tmp_path: Path) -> None:
    template = str(tmp_path / "audit.{pid}.jsonl")
    dead = dead_worker(template, 4242, rotate_first=True)
    with open(dead, "ab") as f:
        f.write(TORN)
    assert any(f.kind == "torn" for r in verify([dead]) for f in r.findings)

    me = WorkerFiles(template, pid=77)
    me.claim()
    try:
        adopted = me.adopt_dead()
    finally:
        me.release()
    assert adopted.pids == [4242]
    assert not os.path.exists(dead) and not os.path.exists(lock_path(dead))
    # both closed segments of the dead pid now carry the adopter's name, oldest first
    assert len(adopted.closed) == 2 and all(Path(p).name.startswith("audit.77.") for p in adopted.closed)
    sealed = Path(sorted(adopted.closed)[-1])
    acts = _actions(sealed)
    assert acts[-2:] == [RECOVERY, FOOTER]
    rec = json.loads(sealed.read_bytes().splitlines()[-2])
    assert rec["audit_meta"]["torn_bytes"] == len(TORN) and rec["audit_meta"]["adopted_pid"] == 4242
    (torn,) = tmp_path.glob("audit.4242.jsonl.torn-*")
    assert torn.read_bytes() == TORN
    # the whole directory verifies, anchors between the two segments included
    assert main_verify([str(tmp_path)], out=open(os.devnull, "w")) == 0
    reps = verify(adopted.closed)
    assert all(r.closed and not r.findings for r in reps)
    assert sum(r.records for r in reps) == 4


def test_live_workers_files_are_never_touched(tmp_path: Path) -> None:
    template = str(tmp_path / "audit.{pid}.jsonl")
    live = WorkerFiles(template, pid=500)
    live.claim()
    path = dead_worker(template, 500)  # its segment, while it holds the lock
    before = Path(path).read_bytes()
    other = WorkerFiles(template, pid=501)
    other.claim()
    try:
        assert other.adopt_dead().pids == []
        assert Path(path).read_bytes() == before and os.path.exists(lock_path(path))
        live.release()  # the process "died": now it is adopted
        assert other.adopt_dead().pids == [500]
        assert not os.path.exists(path)
    finally:
        other.release()


def test_a_clean_dead_segment_gets_a_recovery_record_and_footer(tmp_path: Path) -> None:
    template = str(tmp_path / "w" / "audit-{pid}.jsonl")
    os.makedirs(tmp_path / "w")
    dead_worker(template, 9)
    me = WorkerFiles(template, pid=10)
    me.claim()
    adopted = me.adopt_dead()
    me.release()
    (p,) = adopted.closed
    assert _actions(Path(p))[-2:] == [RECOVERY, FOOTER]
    assert json.loads(Path(p).read_bytes().splitlines()[-1])["audit_meta"]["records"] == 4  # 3 + recovery
    assert not list((tmp_path / "w").glob("*.torn-*"))
    assert (tmp_path / "w" / DIR_LOCK).exists()
    assert not verify([p])[0].findings


def test_only_a_torn_header_leaves_no_segment(tmp_path: Path) -> None:
    template = str(tmp_path / "audit.{pid}.jsonl")
    dead = template.replace("{pid}", "3")
    Path(dead).write_bytes(b'{"event":{"action":"audit-segm')
    me = WorkerFiles(template, pid=4)
    me.claim()
    adopted = me.adopt_dead()
    me.release()
    assert adopted.pids == [3] and adopted.closed == [] and not os.path.exists(dead)
    assert len(list(tmp_path.glob("audit.3.jsonl.torn-*"))) == 1


def test_template_must_name_the_pid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\{pid\}"):
        WorkerFiles(str(tmp_path / "audit.jsonl"))


def test_writer_start_adopts_and_queues_closed_segments_for_the_archive(tmp_path: Path) -> None:
    template = str(tmp_path / "audit.{pid}.jsonl")
    dead_worker(template, 31337)
    archived: list[str] = []

    class Archiver:
        def archive(self, path: str) -> None:
            archived.append(path)

    async def run() -> None:
        files = WorkerFiles(template)
        writer = AuditWriter(AuditSettings(enabled=True, path=files.path), archiver=Archiver())  # type: ignore[arg-type]
        release = await start_worker_audit(writer, files)
        await writer.on_request_end(_ctx())
        await writer.stop()
        await release()

    asyncio.run(run())
    me = f"audit.{os.getpid()}."
    assert len(archived) == 2 and all(Path(p).name.startswith(me) for p in archived)
    assert main_verify([str(tmp_path)], out=open(os.devnull, "w")) == 0


def _ctx():
    from gateway.context import RequestContext

    c = RequestContext("req-1", "/v1/completions")
    c.status = 401
    c.decision = Outcome.UNAUTHENTICATED
    return c


def test_a_second_claim_on_the_same_path_fails_clearly(tmp_path: Path) -> None:
    template = str(tmp_path / "audit.{pid}.jsonl")
    a, b = WorkerFiles(template, pid=5), WorkerFiles(template, pid=5)
    a.claim()
    try:
        with pytest.raises(RuntimeError, match="already held"):
            b.claim()
    finally:
        a.release()
    b.claim()  # free again after a clean release
    b.release()
