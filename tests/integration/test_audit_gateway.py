"""The audit log in a real gateway process in front of the session's real vLLM engine.

- N concurrent requests of mixed outcomes → exactly N records with the right decisions;
- kill -9 under load → every request completed before the kill (minus the documented window) is on disk;
  a restart continues the segment, and handles a torn last line.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from gateway.audit.chain import verify
from tests.conftest import KEY_ALL, KEY_LIMITED, MODEL, gateway_config

pytestmark = pytest.mark.engine

FSYNC = 0.2


def _records(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        for line in p.read_bytes().split(b"\n"):
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a torn last line
    return [r for r in out if r.get("event", {}).get("kind") == "event"]


def _audit_files(d: Path) -> list[Path]:
    return sorted(d.glob("audit*.jsonl"))


def test_concurrent_mixed_outcomes_one_record_each(engine, gateway_factory, tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    cfg = gateway_config(
        [engine.url],
        audit={
            "enabled": True,
            "path": str(audit_dir / "audit.jsonl"),
            "fsync_interval": FSYNC,
            "content": "hash",
        },
    )
    g = gateway_factory(cfg)
    ok_h = {"authorization": f"Bearer {KEY_ALL}"}
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello 13812345678"}],
        "max_tokens": 3,
        "ignore_eos": True,
    }
    cases: list[tuple[str, str, dict, dict | bytes, int, str]] = []
    for _ in range(6):
        cases.append(("POST", "/v1/chat/completions", ok_h, chat, 200, "allowed"))
        cases.append(
            (
                "POST",
                "/v1/completions",
                ok_h,
                {"model": MODEL, "prompt": "a b c", "max_tokens": 2, "ignore_eos": True, "stream": True},
                200,
                "allowed",
            )
        )
        cases.append(("POST", "/v1/chat/completions", {}, chat, 401, "unauthenticated"))
        cases.append(
            (
                "POST",
                "/v1/chat/completions",
                {"authorization": f"Bearer {KEY_LIMITED}"},
                chat,
                403,
                "forbidden",
            )
        )
        cases.append(
            ("POST", "/v1/chat/completions", ok_h, dict(chat, model="no-such-model"), 404, "not_found")
        )
        cases.append(("POST", "/v1/chat/completions", ok_h, b'{"model": "tiny", ', 400, "invalid_request"))
    cases.append(("GET", "/v1/models", ok_h, b"", 200, "allowed"))
    cases.append(("GET", "/v1/models", {}, b"", 401, "unauthenticated"))

    async def run() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(base_url=g.url, timeout=120) as c:

            async def one(i: int, case) -> tuple[str, int]:
                method, path, headers, body, _, _ = case
                h = {**headers, "x-request-id": f"req-mixed-{i}"}
                if isinstance(body, dict):
                    r = await c.request(method, path, headers=h, json=body)
                else:
                    r = await c.request(
                        method, path, headers={**h, "content-type": "application/json"}, content=body
                    )
                await r.aread()
                return r.headers.get("x-request-id", ""), r.status_code

            return await asyncio.gather(*(one(i, case) for i, case in enumerate(cases)))

    results = asyncio.run(run())
    assert [s for _, s in results] == [c[4] for c in cases]
    g.stop()  # graceful: drains the queue, closes the segment
    recs = _records(_audit_files(audit_dir))
    assert len(recs) == len(cases)
    by_id = {r["http"]["request"]["id"]: r for r in recs}
    assert len(by_id) == len(cases)
    for i, (_, path, _, body, status, decision) in enumerate(cases):
        r = by_id[f"req-mixed-{i}"]
        assert r["http"]["response"]["status_code"] == status
        assert r["llm"]["decision"] == decision
        assert r["url"]["path"] == path
        if path != "/v1/models" and status == 200:
            assert r["llm"]["upstream"] == engine.url
            assert r["llm"]["usage"]["completion_tokens"] == body["max_tokens"]
            assert r["llm"]["usage"]["prompt_tokens"] > 0
            assert r["llm"]["stream"] == body.get("stream", False)
            assert r["llm"]["ttft_ms"] is not None and r["event"]["outcome"] == "success"
            assert r["organization"]["id"] == "team-a"
        if status == 403:
            assert r["organization"]["id"] == "team-b" and r["llm"]["model"] == MODEL
    assert "13812345678" not in "".join(p.read_text() for p in _audit_files(audit_dir))  # content: hash only
    assert len(by_id["req-mixed-0"]["llm"]["prompt"]["sha256"]) == 64
    reps = verify([str(p) for p in _audit_files(audit_dir)])
    assert all(not r.findings for r in reps), [str(f) for r in reps for f in r.findings]


def test_kill_9_under_load_loses_no_completed_request(engine, gateway_factory, tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    path = audit_dir / "audit.jsonl"
    cfg = gateway_config([engine.url], audit={"enabled": True, "path": str(path), "fsync_interval": FSYNC})
    g = gateway_factory(cfg)
    completed: dict[str, float] = {}  # request id -> when its response was fully received (monotonic)

    async def load(deadline_after_mark: float) -> tuple[set[str], int]:
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=g.url, timeout=60) as c:

            async def worker(w: int) -> None:
                n = 0
                while not done.is_set():
                    rid = f"req-load-{w}-{n}"
                    n += 1
                    if w % 2 == 0:
                        req = c.post(
                            "/v1/completions",
                            headers={"authorization": f"Bearer {KEY_ALL}", "x-request-id": rid},
                            json={"model": MODEL, "prompt": "x y", "max_tokens": 2, "ignore_eos": True},
                        )
                    else:
                        req = c.post(
                            "/v1/completions",
                            headers={"x-request-id": rid},
                            json={"model": MODEL, "prompt": "x"},
                        )
                    try:
                        r = await req
                    except httpx.HTTPError:
                        return  # the gateway was killed under us
                    if r.status_code in (200, 401):
                        completed[rid] = time.monotonic()

            workers = [asyncio.ensure_future(worker(w)) for w in range(6)]
            await asyncio.sleep(2.0)  # warm load
            mark = time.monotonic()
            # Keep the load on for longer than the fsync window, then kill -9 while requests are in flight.
            await asyncio.sleep(deadline_after_mark)
            g.proc.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            done.set()
            await asyncio.gather(*workers, return_exceptions=True)
        before = {rid for rid, t in completed.items() if t <= mark}
        return before, sum(1 for t in completed.values() if t <= killed_at)

    before, n_completed = asyncio.run(load(FSYNC * 3))
    g.proc.proc.wait(10)
    assert len(before) >= 6, "the load produced too few requests to test anything"
    on_disk = {r["http"]["request"]["id"] for r in _records(_audit_files(audit_dir))}
    missing = before - on_disk
    assert not missing, f"{len(missing)} completed requests not in the audit log: {sorted(missing)[:5]}"
    # Everything on disk is a request the load sent (no duplicates, no strangers).
    assert len(on_disk) == len(_records(_audit_files(audit_dir)))
    assert n_completed >= len(before)

    # Restart on the same file after a torn write (what a crash in the middle of write() leaves behind).
    torn = b'{"@timestamp":"2026-11-29T00:00:00.000Z","event":{"kind":"event","id":"req-torn'
    with open(path, "ab") as f:
        f.write(torn)
    assert any(f.kind == "torn" for f in verify([str(path)])[0].findings)
    g2 = gateway_factory(cfg)
    r = httpx.post(
        g2.url + "/v1/completions", headers={"x-request-id": "req-after-restart"}, json={"model": MODEL}
    )
    assert r.status_code == 401
    g2.stop()
    torn_files = list(audit_dir.glob("audit.jsonl.torn-*"))
    assert len(torn_files) == 1 and torn_files[0].read_bytes() == torn
    files = _audit_files(audit_dir)
    reps = verify([str(p) for p in files])
    assert all(not r.findings for r in reps), [str(f) for r in reps for f in r.findings]
    ids = {r["http"]["request"]["id"] for r in _records(files)}
    assert before <= ids and "req-after-restart" in ids and "req-torn" not in ids
