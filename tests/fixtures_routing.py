"""Fixtures for the routing tests: simulated faulty upstreams and gateways stopped at the end of a test."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support import PY, REPO, Gateway, Proc, free_port, wait_http


class FakeUpstream:
    """scripts/sim_upstream.py as a subprocess; ``mode`` picks the fault it injects (~10 ms per stream event)."""

    def __init__(self, mode: str = "ok", delay: float = 5.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(
            [
                PY,
                str(REPO / "scripts" / "sim_upstream.py"),
                "--port",
                str(self.port),
                "--mode",
                mode,
                "--delay",
                str(delay),
                "--chunks",
                "4",
                "--chunk-delay",
                "0.01",
            ],
            name=f"fake-{mode}",
        )

    def wait_ready(self) -> FakeUpstream:
        wait_http(self.url + "/health", 30, self.proc.proc)
        return self

    def set_mode(self, mode: str, delay: float | None = None) -> None:
        body: dict[str, Any] = {"mode": mode, "reset": True}
        if delay is not None:
            body["delay"] = delay
        httpx.post(self.url + "/_mode", json=body, timeout=5).raise_for_status()

    @property
    def completions(self) -> int:
        return httpx.get(self.url + "/_stats", timeout=5).json()["completions"]

    def stop(self) -> None:
        self.proc.stop(timeout=5)


@pytest.fixture
def fake_upstream_factory() -> Iterator[Callable[..., FakeUpstream]]:
    started: list[FakeUpstream] = []

    def start(mode: str = "ok", delay: float = 5.0) -> FakeUpstream:
        f = FakeUpstream(mode, delay)
        started.append(f)
        return f.wait_ready()

    yield start
    for f in started:
        f.stop()


@pytest.fixture
def routing_gateway() -> Iterator[Callable[..., Gateway]]:
    """Start a gateway for one test (stopped, with its log shown on failure, when the test ends)."""
    started: list[Gateway] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> Gateway:
        g = Gateway(config, env=env, name="gateway-routing")
        started.append(g)
        return g.wait_ready()

    yield start
    for g in started:
        g.stop()


def gateway_metric(gw: Gateway, name: str, **labels: str) -> float:
    """Sum of a gateway /metrics sample family, filtered by labels."""
    text = httpx.get(gw.metrics_url, timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sse_events(lines: list[str]) -> tuple[list[dict], bool]:
    """Parsed ``data:`` events of a stream and whether it ended with [DONE]."""
    events: list[dict] = []
    done = False
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        events.append(json.loads(data))
    return events, done


def kill_engine_hard(engine) -> None:
    """SIGKILL a real engine at once: vLLM (its own process group, child of the supervisor) and the
    supervisor. A replica dying without warning, as when its node fails."""
    import os
    import signal
    from pathlib import Path

    sup = engine.proc.pid
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == sup:  # ppid
            child = int(stat.parent.name)
            try:
                os.killpg(os.getpgid(child), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    engine.proc.signal(signal.SIGKILL)
