"""AuditWriter: one record per request, content policy, back-pressure (never drops), rotation, torn-line recovery."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.chain import verify
from gateway.audit.config import AuditSettings
from gateway.audit.sink import SINKS, FileSink, StdoutSink, build_sink
from gateway.audit.writer import AuditGate, AuditWriter
from gateway.auth.principal import Principal
from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.hooks import NoAdmissionControl
from gateway.outcome import Outcome


def _ctx(
    i: int, status: int = 200, decision: str = "allowed", body: dict[str, Any] | None = None
) -> RequestContext:
    c = RequestContext(f"req-{i}", "/v1/chat/completions", "POST", "203.0.113.7")
    c.principal = Principal(subject=f"user-{i % 3}", tenant="team-a", key_id="k1")
    c.model = "tiny"
    c.status = status
    c.decision = Outcome(decision)
    c.endpoint = "http://127.0.0.1:9"
    c.prompt_tokens, c.completion_tokens = 7, 5
    c.ttft = 0.0123
    c.bytes_in, c.bytes_out = 100, 200
    c.body = body
    c.finished = time.perf_counter()
    return c


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _requests(path: Path) -> list[dict[str, Any]]:
    return [r for r in _records(path) if r["event"]["kind"] == "event"]


async def test_one_record_per_request_with_ecs_fields(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    w = AuditWriter(AuditSettings(enabled=True, path=str(p), fsync_interval=0.05))
    await w.start()
    outcomes = [
        (200, "allowed"),
        (401, "unauthenticated"),
        (403, "forbidden"),
        (429, "rate_limited"),
        (502, "upstream_error"),
    ]
    for i in range(50):
        st, dec = outcomes[i % len(outcomes)]
        await w.on_request_end(_ctx(i, st, dec))
    await w.stop()
    recs = _requests(p if p.exists() else next(tmp_path.glob("audit.*.jsonl")))
    assert [r["event"]["id"] for r in recs] == [f"req-{i}" for i in range(50)]
    r0, r1 = recs[0], recs[1]
    assert r0["http"]["response"]["status_code"] == 200 and r0["llm"]["decision"] == "allowed"
    assert r0["event"]["outcome"] == "success" and r0["event"]["type"] == ["access"]
    assert r1["event"]["outcome"] == "failure" and r1["event"]["type"] == ["denied"]
    assert (
        r0["client"]["ip"] == "203.0.113.7"
        and r0["user"]["id"] == "key:user-0"
        and r0["organization"]["id"] == "team-a"
    )
    assert r0["llm"]["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert r0["llm"]["ttft_ms"] == 12.3 and r0["llm"]["upstream"] == "http://127.0.0.1:9"
    assert r0["http"]["request"]["bytes"] == 100 and r0["http"]["response"]["bytes"] == 200
    assert r0["@timestamp"].endswith("Z") and isinstance(r0["event"]["duration"], int)
    assert "prompt" not in r0["llm"]  # content policy: none by default
    assert w.fsyncs >= 1 and w.queue_depth() == 0


@pytest.mark.parametrize("mode", ["none", "hash", "redacted"])
async def test_content_policy(tmp_path: Path, mode: str) -> None:
    p = tmp_path / "audit.jsonl"
    w = AuditWriter(AuditSettings(enabled=True, path=str(p), content=mode))
    await w.start()
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "You are a clinic assistant."},
            {"role": "user", "content": "我是王五，电话13812345678，邮箱wang5@example.com"},
        ],
    }
    await w.on_request_end(_ctx(1, body=body))
    await w.on_request_end(_ctx(2, body={"model": "tiny", "prompt": "card 4111111111111111"}))
    await w.stop()
    text = next(tmp_path.glob("audit.*.jsonl")).read_text()
    assert "13812345678" not in text and "wang5@example.com" not in text and "4111111111111111" not in text
    r1, r2 = _requests(next(tmp_path.glob("audit.*.jsonl")))
    if mode == "none":
        assert "prompt" not in r1["llm"] and "clinic" not in text
    elif mode == "hash":
        expect = hashlib.sha256(
            b"system\nYou are a clinic assistant.\x00user\n"
            + "我是王五，电话13812345678，邮箱wang5@example.com".encode()
        ).hexdigest()
        assert r1["llm"]["prompt"] == {"sha256": expect}
        assert r2["llm"]["prompt"] == {"sha256": hashlib.sha256(b"prompt\ncard 4111111111111111").hexdigest()}
    else:
        assert r1["llm"]["prompt"]["messages"][1] == {
            "role": "user",
            "content": "我是王五，电话[PHONE]，邮箱[EMAIL]",
        }
        assert r1["llm"]["prompt"]["redactions"] == {"email": 1, "cn_mobile": 1}
        assert r2["llm"]["prompt"]["messages"] == [{"role": "prompt", "content": "card [BANK_CARD]"}]


class GatedSink(FileSink):
    """A real file sink whose fsync waits for a test-controlled gate (a stalled disk)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.in_sync = asyncio.Event()

    async def sync(self) -> None:
        self.in_sync.set()
        await self.gate.wait()
        await super().sync()


@pytest.mark.parametrize("on_full", ["reject", "block"])
async def test_full_queue_back_pressure_never_drops(tmp_path: Path, on_full: str) -> None:
    p = tmp_path / "audit.jsonl"
    settings = AuditSettings(
        enabled=True, path=str(p), queue_size=4, fsync_interval=0.001, on_full=on_full, block_timeout=0
    )
    sink = GatedSink(str(p))
    w = AuditWriter(settings, sink=sink)
    gate = AuditGate(NoAdmissionControl(), w)
    await w.start()
    await w.on_request_end(_ctx(0))
    await asyncio.wait_for(sink.in_sync.wait(), 5)  # the writer is stuck in fsync
    for i in range(1, 5):
        await w.on_request_end(_ctx(i))
    assert w.is_full() and w.queue_depth() == 4
    # The observer call of a finishing request waits for room instead of dropping its record.
    pending = asyncio.ensure_future(w.on_request_end(_ctx(5)))
    await asyncio.sleep(0.05)
    assert not pending.done()
    # New requests: 503 at once (reject) or held until the writer catches up (block).
    if on_full == "reject":
        with pytest.raises(ApiError) as ei:
            await gate.admit(_ctx(99))
        assert ei.value.status == 503 and ei.value.code == "audit_backpressure"
    else:
        held = asyncio.ensure_future(gate.admit(_ctx(99)))
        await asyncio.sleep(0.05)
        assert not held.done()
    sink.gate.set()
    await asyncio.wait_for(pending, 5)
    if on_full == "block":
        await asyncio.wait_for(held, 5)
    await w.stop()
    ids = [r["event"]["id"] for r in _requests(next(tmp_path.glob("audit.*.jsonl")))]
    assert ids == [f"req-{i}" for i in range(6)]
    assert w.full_waits == 1 and w.rejected == 1


async def test_block_mode_times_out_with_503(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    settings = AuditSettings(
        enabled=True, path=str(p), queue_size=1, fsync_interval=0.001, on_full="block", block_timeout=0.1
    )
    sink = GatedSink(str(p))
    w = AuditWriter(settings, sink=sink)
    await w.start()
    await w.on_request_end(_ctx(0))
    await asyncio.wait_for(sink.in_sync.wait(), 5)
    await w.on_request_end(_ctx(1))
    with pytest.raises(ApiError) as ei:
        await AuditGate(NoAdmissionControl(), w).admit(_ctx(2))
    assert ei.value.status == 503
    sink.gate.set()
    await w.stop()
    assert len(_requests(next(tmp_path.glob("audit.*.jsonl")))) == 2


async def test_rotation_by_size_and_time_keeps_chain(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    w = AuditWriter(AuditSettings(enabled=True, path=str(p), rotate_bytes=3000, fsync_interval=0.01))
    await w.start()
    for i in range(20):
        await w.on_request_end(_ctx(i))
        await asyncio.sleep(0.005)
    await w.stop()
    files = sorted(tmp_path.glob("audit.*.jsonl"))
    assert len(files) >= 3
    reps = verify([str(f) for f in files] + ([str(p)] if p.exists() else []))
    assert all(not r.findings for r in reps), [str(f) for r in reps for f in r.findings]
    ids = [r["event"]["id"] for f in files for r in _requests(f)]
    assert ids == [f"req-{i}" for i in range(20)]

    q = tmp_path / "t" / "audit.jsonl"
    w = AuditWriter(AuditSettings(enabled=True, path=str(q), rotate_seconds=0.2, rotate_bytes=0))
    await w.start()
    await w.on_request_end(_ctx(0))
    for _ in range(100):
        if list(q.parent.glob("audit.*.jsonl")):
            break
        await asyncio.sleep(0.02)
    await w.on_request_end(_ctx(1))
    await w.stop()
    closed = sorted(q.parent.glob("audit.*.jsonl"))
    assert len(closed) >= 2  # one closed by age, one at shutdown
    assert [r["event"]["id"] for f in closed for r in _requests(f)] == ["req-0", "req-1"]
    assert all(not r.findings for r in verify([str(f) for f in closed]))


async def test_restart_after_crash_handles_torn_line(tmp_path: Path) -> None:
    p = tmp_path / "audit.jsonl"
    w = AuditWriter(AuditSettings(enabled=True, path=str(p)))
    await w.start()
    for i in range(5):
        await w.on_request_end(_ctx(i))
    while w.records_written < 5:
        await asyncio.sleep(0.01)
    # Simulate kill -9 in the middle of a write: the writer never closes; half a line is left.
    w._task.cancel()  # noqa: SLF001
    os.close(w.sink.fd)
    torn = b'{"@timestamp":"2026-01-01T00:00:00.000Z","event":{"kind":"event","id":"req-torn"'
    with open(p, "ab") as f:
        f.write(torn)
    assert verify([str(p)])[0].findings[-1].kind == "torn"

    w2 = AuditWriter(AuditSettings(enabled=True, path=str(p)))
    await w2.start()
    for i in range(5, 8):
        await w2.on_request_end(_ctx(i))
    await w2.stop()
    (seg,) = tmp_path.glob("audit.*.jsonl")
    (torn_file,) = tmp_path.glob("audit.jsonl.torn-*")
    assert torn_file.read_bytes() == torn
    recs = _records(seg)
    assert [r["event"]["id"] for r in recs if r["event"]["kind"] == "event"] == [f"req-{i}" for i in range(8)]
    recovery = [r for r in recs if r["event"]["action"] == "audit-recovery"]
    assert len(recovery) == 1
    assert recovery[0]["audit_meta"]["torn_bytes"] == len(torn)
    assert recovery[0]["audit_meta"]["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert not verify([str(seg)])[0].findings  # one unbroken chain across the restart


async def test_stdout_sink(tmp_path: Path) -> None:
    r, wfd = os.pipe()
    w = AuditWriter(AuditSettings(enabled=True, sink="stdout"), sink=StdoutSink(wfd))
    await w.start()
    for i in range(3):
        await w.on_request_end(_ctx(i))
    await w.stop()
    os.close(wfd)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    out = tmp_path / "stdout.jsonl"
    out.write_bytes(data)
    assert [x["event"]["id"] for x in _requests(out)] == ["req-0", "req-1", "req-2"]
    assert not verify([str(out)])[0].findings


class NetworkLikeSink:
    """An AuditSink whose write awaits its I/O (as a network sink would) until the test lets it finish."""

    def __init__(self) -> None:
        self.on_closed = None
        self.records: list[dict] = []
        self.gate = asyncio.Event()
        self.in_write = asyncio.Event()

    async def open(self) -> None:
        return None

    async def write(self, recs: list[dict]) -> None:
        self.in_write.set()
        await self.gate.wait()
        self.records.extend(recs)

    async def sync(self) -> None:
        return None

    def rotate_due_in(self) -> float | None:
        return None

    async def maybe_rotate(self) -> None:
        return None

    def closed_segments(self) -> list[str]:
        return []

    async def close(self) -> None:
        return None


async def test_a_sink_awaiting_its_io_leaves_the_event_loop_free() -> None:
    sink = NetworkLikeSink()
    w = AuditWriter(AuditSettings(enabled=True, queue_size=10), sink=sink)
    await w.start()
    await w.on_request_end(_ctx(0))
    await asyncio.wait_for(sink.in_write.wait(), 5)
    # While the sink waits on its I/O, other tasks run and requests keep being accepted.
    await asyncio.wait_for(asyncio.sleep(0.01), 1)
    await w.on_request_end(_ctx(1))
    assert w.queue_depth() == 1 and w.records_written == 0
    sink.gate.set()
    await w.stop()
    assert [r["event"]["id"] for r in sink.records] == ["req-0", "req-1"]
    assert w.stats().records_written == 2


def test_sinks_are_chosen_by_the_configured_name(tmp_path: Path) -> None:
    assert set(SINKS) == set(AuditSettings.model_fields["sink"].annotation.__args__)
    assert type(build_sink(AuditSettings(sink="stdout"))) is StdoutSink
    f = build_sink(AuditSettings(sink="file", path=str(tmp_path / "a.jsonl"), rotate_bytes=123))
    assert type(f) is FileSink and f.rotate_bytes == 123
