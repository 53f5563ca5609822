"""The audit log of a multi-worker gateway (GATEWAY_WORKERS=2, real processes) through repeated kill -9:
dead workers' segments are adopted (torn line cut off, sealed), and ``llm-gateway audit verify`` passes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import KEY_ALL, gateway_config
from tests.support import PY, REPO

FSYNC = 0.2
TORN = b'{"@timestamp":"2026-12-01T00:00:00.000Z","event":{"kind":"event","id":"req-torn'


def _records(d: Path) -> list[dict]:
    out = []
    for p in sorted(d.glob("*.jsonl")):
        for line in p.read_bytes().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event", {}).get("kind") == "event":
                out.append(obj)
    return out


def _records_in(p: Path) -> list[bytes]:
    return [x for x in p.read_bytes().splitlines() if b'"kind":"event"' in x]


def _active(d: Path) -> list[Path]:
    """Active (not closed) segments: audit.<pid>.jsonl."""
    return [p for p in d.glob("audit.*.jsonl") if p.name.count(".") == 2]


def _send(url: str, ids: list[str], n: int, tag: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as c:
        for i in range(n):
            rid = f"req-{tag}-{i}"
            # unauthenticated and authorized requests are both recorded; no engine needed
            if i % 2:
                r = c.get("/v1/models", headers={"authorization": f"Bearer {KEY_ALL}", "x-request-id": rid})
                assert r.status_code == 200
            else:
                r = c.post("/v1/completions", headers={"x-request-id": rid}, json={"model": "m"})
                assert r.status_code == 401
            ids.append(rid)


def _wait_workers(g, n: int, audit_dir: Path, timeout: float = 30) -> None:
    """Both workers serve once each has its active segment and lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {p.name.split(".")[1] for p in _active(audit_dir)}
        live = [p for p in pids if (audit_dir / f"audit.{p}.jsonl.lock").exists() and _alive(int(p))]
        if len(live) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"workers did not start: {g.proc.log()[-3000:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_kill_9_of_a_multi_worker_gateway_leaves_a_verifiable_audit_log(
    gateway_factory, tmp_path: Path
) -> None:
    audit_dir = tmp_path / "audit"
    cfg = gateway_config(
        ["http://127.0.0.1:9"],
        audit={"enabled": True, "path": str(audit_dir / "audit.{pid}.jsonl"), "fsync_interval": FSYNC},
        health_interval=5,
    )
    env = {"GATEWAY_WORKERS": "2"}
    sent: list[str] = []
    kills = 2
    for round_ in range(kills):
        g = gateway_factory(cfg, env=env)
        _wait_workers(g, 2, audit_dir)
        _send(g.url, sent, 12, f"r{round_}")
        time.sleep(FSYNC * 5)  # past the write + fsync window (docs/audit.md)
        g.proc.signal(signal.SIGKILL)  # the supervisor and both workers
        g.proc.proc.wait(10)
        time.sleep(0.2)
        dead = _active(audit_dir)
        assert len(dead) >= 2, "each worker left its active segment"
        if round_ == 1:
            with open(dead[0], "ab") as f:  # a worker died inside write()
                f.write(TORN)
            torn_victim = dead[0].name

    # A last start adopts everything dead; a clean stop seals its own segments.
    g = gateway_factory(cfg, env=env)
    _wait_workers(g, 2, audit_dir)
    _send(g.url, sent, 4, "last")
    # adoption happens at start: no active segment of a dead pid is left while the new workers run
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        not _alive(int(p.name.split(".")[1])) for p in _active(audit_dir)
    ):
        time.sleep(0.1)
    assert all(_alive(int(p.name.split(".")[1])) for p in _active(audit_dir))
    g.stop()

    # A clean stop closes every segment that holds records (a worker that got none keeps its header-only
    # segment; the next start adopts it) and removes its lock file.
    assert all(not _records_in(p) for p in _active(audit_dir))
    assert not list(audit_dir.glob("*.jsonl.lock")), "no lock file is left"
    torn = list(audit_dir.glob(f"{torn_victim}.torn-*"))
    assert len(torn) == 1 and torn[0].read_bytes() == TORN

    out = subprocess.run(
        [PY, "-m", "gateway", "audit", "verify", str(audit_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout and out.stdout.count("closed segment") >= 2 * kills + 1

    # the client's X-Request-Id is kept as http.request.id (event ids are always the gateway's own)
    ids = [r["http"]["request"]["id"] for r in _records(audit_dir)]
    assert sorted(ids) == sorted(sent), "every request exactly once, nothing else"
    recoveries = [
        json.loads(line)
        for p in audit_dir.glob("*.jsonl")
        for line in p.read_bytes().splitlines()
        if b'"adopted_pid"' in line
    ]
    assert len(recoveries) >= 2 * kills
    assert sum(1 for r in recoveries if r["audit_meta"].get("torn_bytes") == len(TORN)) == 1
