"""SIGTERM to the gateway while streams run: /readyz turns 503, new requests are refused with a 503, the
running streams complete in full, then the process exits cleanly; a stream that outlasts the drain
deadline ends with an error event and [DONE] rather than a cut connection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest
import yaml

from tests.conftest import KEY_ALL, MODEL, gateway_config
from tests.fixtures_routing import sse_events
from tests.support import REPO, free_port

AUTH = {"Authorization": f"Bearer {KEY_ALL}"}
MAX_TOKENS = 800


@pytest.mark.engine
def test_sigterm_during_streams_completes_them(engine, routing_gateway):
    gw = routing_gateway(gateway_config([engine.url], drain_timeout=120))
    started = [threading.Event() for _ in range(3)]
    results: list = [None] * 3

    def run(i: int) -> None:
        body = {
            "model": MODEL,
            "prompt": f"Story number {i}:",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": True,
        }
        lines = []
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=AUTH, timeout=300) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: {"):
                    started[i].set()
            results[i] = (r.status_code, lines)
        started[i].set()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for ev in started:
        assert ev.wait(120)
    gw.proc.signal(signal.SIGTERM)

    # Draining: not ready any more, new work refused (the streams are still running).
    for _ in range(100):
        ready = httpx.get(gw.url + "/readyz", timeout=5)
        if ready.status_code == 503:
            break
    assert ready.status_code == 503 and ready.json()["draining"] is True
    refused = httpx.post(
        gw.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 2},
        headers=AUTH,
        timeout=30,
    )
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert any(t.is_alive() for t in threads)

    for t in threads:
        t.join(300)
    for status, lines in results:
        events, done = sse_events(lines)
        assert status == 200 and done
        assert not any("error" in e for e in events)
        assert sum(len(e["choices"]) for e in events) >= 1
    assert gw.proc.proc.wait(60) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_streams_still_running_at_the_drain_deadline_end_with_an_error_event(
    fake_upstream_factory, routing_gateway, workers
):
    fake = fake_upstream_factory("ok")  # ~10 ms per token: 3000 tokens outlast the 1 s drain deadline
    # The signal goes to the whole process group: with several workers each gets it directly and from the
    # supervisor, and must still drain (not take the second copy as "exit now").
    gw = routing_gateway(gateway_config([fake.url], drain_timeout=1, workers=workers))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "stream": True}
    lines = []
    with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 2:
                gw.proc.signal(signal.SIGTERM)
    events, done = sse_events(lines)
    assert r.status_code == 200 and done
    assert 1 < len(events) < 3000
    assert events[-1]["error"]["code"] == "draining"
    assert gw.proc.proc.wait(30) == 0


def test_several_workers_drain_like_one(fake_upstream_factory, routing_gateway):
    """SIGTERM to the supervisor only (as Kubernetes sends it to PID 1): every worker turns not-ready and
    refuses new work, the running stream completes in full, then everything exits cleanly."""
    fake = fake_upstream_factory("ok")  # ~10 ms per token: 300 tokens take about 3 s
    gw = routing_gateway(gateway_config([fake.url], drain_timeout=60, workers=2))
    body = {"model": MODEL, "prompt": "x", "max_tokens": 300, "stream": True}
    started = threading.Event()
    result: list = []

    def run() -> None:
        lines = []
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                started.set()
            result.append((r.status_code, lines))
        started.set()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(30)
    os.kill(gw.proc.pid, signal.SIGTERM)
    # Draining: every worker answers not-ready (several probes in a row land on both workers).
    statuses: list[int] = []
    for _ in range(200):
        statuses.append(httpx.get(gw.url + "/readyz", timeout=5).status_code)
        if statuses[-8:] == [503] * 8:
            break
    assert statuses[-8:] == [503] * 8
    refused = httpx.post(gw.url + "/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    assert t.is_alive()
    t.join(60)
    status, lines = result[0]
    events, done = sse_events(lines)
    assert status == 200 and done
    assert not any("error" in e for e in events)
    assert len(events) == 300
    assert gw.proc.proc.wait(30) == 0


def test_workers_whose_app_cannot_start_stop_the_gateway(tmp_path):
    """A worker that fails at start (here: its audit file cannot be created) is not restarted forever."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    cfg = gateway_config(["http://127.0.0.1:9"], workers=2)
    cfg["audit"] = {"enabled": True, "sink": "file", "path": str(not_a_dir / "audit-{pid}.jsonl")}
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 1
    assert "could not start its app" in r.stdout + r.stderr
