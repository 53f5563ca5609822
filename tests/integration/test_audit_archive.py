"""Closed audit segments go to the real S3 server (nanio) and are deleted locally only after verification."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
import uuid
from pathlib import Path

import pytest
from minio.error import S3Error

from gateway.audit.archive import ArchiveError, Archiver
from gateway.audit.chain import verify
from gateway.audit.config import AuditSettings
from gateway.audit.writer import AuditWriter
from gateway.context import RequestContext


def _bucket() -> str:
    return "audit-" + uuid.uuid4().hex[:12]


def _ctx(i: int) -> RequestContext:
    c = RequestContext(f"req-{i}", "/v1/completions", "POST", "127.0.0.1")
    c.status, c.model = 200, "tiny"
    c.finished = time.perf_counter()
    return c


def _segment(tmp_path: Path, n: int = 5) -> Path:
    async def go() -> None:
        w = AuditWriter(AuditSettings(enabled=True, path=str(tmp_path / "audit.jsonl")))
        await w.start()
        for i in range(n):
            await w.on_request_end(_ctx(i))
        await w.stop()

    asyncio.run(go())
    (seg,) = tmp_path.glob("audit.*.jsonl")
    return seg


def test_archive_uploads_verifies_then_deletes(s3_server, tmp_path: Path) -> None:
    seg = _segment(tmp_path)
    data = seg.read_bytes()
    bucket = _bucket()
    client = s3_server.client()
    a = Archiver(client, bucket, "audit/", host="gw-1")
    key = a.archive(str(seg))
    assert key == f"audit/gw-1/{seg.name}"
    assert not seg.exists()
    st = client.stat_object(bucket, key)
    assert st.size == len(data)
    assert {k.lower(): v for k, v in st.metadata.items()}["x-amz-meta-sha256"] == hashlib.sha256(
        data
    ).hexdigest()
    resp = client.get_object(bucket, key)
    try:
        assert resp.read() == data
    finally:
        resp.close()
        resp.release_conn()


def test_local_copy_kept_when_verification_fails(s3_server, tmp_path: Path, monkeypatch) -> None:
    seg = _segment(tmp_path)
    bucket = _bucket()
    client = s3_server.client()
    a = Archiver(client, bucket, "audit/", host="gw-1")
    # The real server's object differs from what we hold (overwritten behind our back): verify says so.
    client.make_bucket(bucket)
    digest = hashlib.sha256(seg.read_bytes()).hexdigest()
    other = b'{"forged":true}\n'
    client.put_object(bucket, "audit/x.jsonl", io.BytesIO(other), len(other), metadata={"sha256": digest})
    with pytest.raises(ArchiveError):
        a.verify("audit/x.jsonl", digest, seg.stat().st_size)

    # A failed verification leaves the local segment in place.
    def fail(key: str, digest: str, size: int) -> None:
        raise ArchiveError("injected")

    monkeypatch.setattr(a, "verify", fail)
    with pytest.raises(ArchiveError):
        a.archive(str(seg))
    assert seg.exists()
    # No bucket and no permission to create one: nothing uploaded, nothing deleted.
    b = Archiver(client, _bucket(), create_bucket=False)
    with pytest.raises(S3Error):
        b.archive(str(seg))
    assert seg.exists()


async def test_writer_archives_rotated_segments(s3_server, tmp_path: Path, monkeypatch) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = _bucket()
    settings = AuditSettings(
        enabled=True,
        path=str(tmp_path / "audit.jsonl"),
        rotate_bytes=2000,
        fsync_interval=0.01,
        archive_bucket=bucket,
        archive_prefix="gw/",
    )
    w = AuditWriter.from_settings(settings)  # client from S3_ENDPOINT_URL / AWS_* variables
    await w.start()
    for i in range(30):
        await w.on_request_end(_ctx(i))
        await asyncio.sleep(0.003)
    await w.stop()
    assert not list(tmp_path.glob("audit.*.jsonl")), "closed segments must be gone locally after upload"
    client = s3_server.client()
    objs = sorted(o.object_name for o in client.list_objects(bucket, prefix="gw/", recursive=True))
    assert len(objs) >= 2 and sorted(w.archiver.archived) == objs
    # The archived segments still verify, anchors between them included.
    for name in objs:
        resp = client.get_object(bucket, name)
        try:
            (tmp_path / "dl").mkdir(exist_ok=True)
            (tmp_path / "dl" / os.path.basename(name)).write_bytes(resp.read())
        finally:
            resp.close()
            resp.release_conn()
    files = sorted(str(p) for p in (tmp_path / "dl").iterdir())
    reps = verify(files)
    assert all(not r.findings for r in reps)
    assert sum(r.records for r in reps) == 30
