#!/usr/bin/env python3
"""Unauthenticated pressure against the gateway: does its memory stay flat and do real callers keep their latency?

Starts a simulated upstream (scripts/sim_upstream.py: the gateway's own cost is what is measured) and a gateway
process with its default limits, then

1. measures authenticated latency (non-streamed completions, one at a time) and the gateway's RSS at rest;
2. for ``--seconds`` (default 30) keeps ``--connections`` (default 200) unauthenticated connections busy, in
   four kinds, each reconnecting whenever the gateway closes it:
   - ``header``: an endless header line sent in 64 KiB pieces (the gateway should answer 431 and close);
   - ``many-headers``: header lines of 100 bytes without end (431 after the count limit);
   - ``body``: a POST without a credential declaring a 9 MiB body, then sending it (401 at once, closed);
   - ``slow``: a request head one byte every 100 ms (408 at the head deadline);
   while the same authenticated latency loop runs and RSS is sampled every 0.25 s;
3. writes results/bench_hostile.{json,md}: RSS at rest / max / delta, p50/p99 latency at rest and under
   pressure, the status codes the attackers received.

    python scripts/bench_hostile.py [--seconds 30] [--connections 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-bench-hostile"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


async def latency_loop(url: str, stop: asyncio.Event, out: list[float]) -> None:
    body = {"model": "sim", "prompt": "hello", "max_tokens": 4}
    async with httpx.AsyncClient(timeout=30) as c:
        while not stop.is_set():
            t = time.perf_counter()
            r = await c.post(url + "/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
            if r.status_code == 200:
                out.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)


async def read_status(reader: asyncio.StreamReader, timeout: float) -> str:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (TimeoutError, ConnectionError, OSError):
        return "no-answer"
    parts = line.split()
    return parts[1].decode() if len(parts) >= 2 else "closed"


async def attacker(kind: str, port: int, stop: asyncio.Event, statuses: Counter, pause: float) -> None:
    """One hostile connection at a time, reconnecting ``pause`` seconds after the gateway closed the last one."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            statuses["connect-error"] += 1
            await asyncio.sleep(pause)
            continue
        answer = asyncio.create_task(read_status(reader, 3600))
        try:
            if kind == "header":
                chunks = [b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"a" * 65536] * 512  # 32 MiB
                delay = 0.0
            elif kind == "many-headers":
                chunks = [b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"] + [
                    b"".join(b"X-H%05d: %s\r\n" % (i * 100 + j, b"v" * 90) for j in range(100))
                    for i in range(200)
                ]
                delay = 0.0
            elif kind == "body":
                size = 9 * 1024 * 1024
                head = (
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % size
                )
                chunks = [head] + [b" " * 65536] * (size // 65536)
                delay = 0.0
            else:  # slow: one byte every 100 ms
                chunks = [
                    bytes([c]) for c in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 10000
                ]
                delay = 0.1
            for c in chunks:
                if stop.is_set() or answer.done():
                    break
                writer.write(c)
                await asyncio.wait_for(writer.drain(), 10)
                if delay:
                    await asyncio.sleep(delay)
            try:
                status = await asyncio.wait_for(asyncio.shield(answer), 2 if stop.is_set() else 15)
            except TimeoutError:
                status = "no-answer"
            statuses[f"{kind}:{status}"] += 1
        except (TimeoutError, ConnectionError, OSError):
            statuses[f"{kind}:{answer.result() if answer.done() else 'reset'}"] += 1
        finally:
            answer.cancel()
            writer.close()
        await asyncio.sleep(pause)


async def run(args: argparse.Namespace, gw_url: str, gw_port: int, gw_pid: int) -> dict:
    # At rest.
    stop = asyncio.Event()
    rest: list[float] = []
    task = asyncio.create_task(latency_loop(gw_url, stop, rest))
    await asyncio.sleep(args.rest_seconds)
    stop.set()
    await task
    rss_rest = rss_mb(gw_pid)
    # Under pressure.
    # The attackers run in a process of their own, so their event loop does not delay the latency probe's.
    stop = asyncio.Event()
    busy: list[float] = []
    attack = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--attack",
        str(gw_port),
        "--seconds",
        str(args.seconds),
        "--connections",
        str(args.connections),
        "--reconnect-pause",
        str(args.reconnect_pause),
        stdout=asyncio.subprocess.PIPE,
    )
    lat = asyncio.create_task(latency_loop(gw_url, stop, busy))
    samples: list[float] = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        samples.append(rss_mb(gw_pid))
        await asyncio.sleep(0.25)
    stop.set()
    await lat
    out, _ = await attack.communicate()
    statuses = Counter(json.loads(out.decode().strip().splitlines()[-1]))
    await asyncio.sleep(1)
    rss_after = rss_mb(gw_pid)

    def pct(xs: list[float], q: float) -> float | None:
        if not xs:
            return None
        return (
            round(statistics.quantiles(xs, n=100)[q - 1] * 1000, 2)
            if len(xs) >= 2
            else round(xs[0] * 1000, 2)
        )

    return {
        "connections": args.connections,
        "seconds": args.seconds,
        "rss_mb": {
            "rest": round(rss_rest, 1),
            "max_under_pressure": round(max(samples), 1),
            "after": round(rss_after, 1),
            "delta_max": round(max(samples) - rss_rest, 1),
        },
        "latency_ms": {
            "rest": {"n": len(rest), "p50": pct(rest, 50), "p99": pct(rest, 99)},
            "under_pressure": {"n": len(busy), "p50": pct(busy, 50), "p99": pct(busy, 99)},
        },
        "attacker_outcomes": dict(sorted(statuses.items())),
    }


async def attack_only(port: int, seconds: float, connections: int, pause: float) -> None:
    stop = asyncio.Event()
    statuses: Counter = Counter()
    kinds = ["header", "many-headers", "body", "slow"]
    tasks = [
        asyncio.create_task(attacker(kinds[i % 4], port, stop, statuses, pause)) for i in range(connections)
    ]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.sleep(2.5)  # answers already on their way are counted
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(dict(statuses)), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attack", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rest-seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--reconnect-pause", type=float, default=0.2)
    ap.add_argument("--out", default=str(REPO / "results"))
    args = ap.parse_args()
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # writes after the gateway closed: expected here
    if args.attack:
        asyncio.run(attack_only(args.attack, args.seconds, args.connections, args.reconnect_pause))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    up_port, gw_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "scripts" / "sim_upstream.py"), "--port", str(up_port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )
        cfg = tmp / "gw.yaml"
        cfg.write_text(
            f'models:\n  - name: sim\n    upstreams: ["http://127.0.0.1:{up_port}"]\n'
            f"api_keys:\n  - id: bench\n    sha256: {hashlib.sha256(KEY.encode()).hexdigest()}\n"
        )
        gw_env = dict(
            env,
            GATEWAY_CONFIG=str(cfg),
            GATEWAY_PORT=str(gw_port),
            GATEWAY_METRICS_PORT=str(free_port()),
            GATEWAY_LOG_LEVEL="error",
        )
        gw = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            env=gw_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        procs.append(gw)
        gw_url = f"http://127.0.0.1:{gw_port}"
        wait_ok(gw_url + "/readyz")
        result = asyncio.run(run(args, gw_url, gw_port, gw.pid))
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    result["command"] = "python scripts/bench_hostile.py " + " ".join(sys.argv[1:])
    result["machine"] = (
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (shared box: noisy)"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_hostile.json").write_text(json.dumps(result, indent=2) + "\n")
    r, lat = result["rss_mb"], result["latency_ms"]
    md = [
        "# Unauthenticated pressure: gateway memory and authenticated latency",
        "",
        f"{result['connections']} unauthenticated connections for {result['seconds']:.0f} s (endless header line, "
        "endless header count, 9 MiB bodies without a credential, a head one byte per 100 ms), each reconnecting "
        "when closed; a simulated upstream.",
        "",
        "| gateway RSS (MB) | at rest | max under pressure | delta | after |",
        "|---|---|---|---|---|",
        f"| | {r['rest']} | {r['max_under_pressure']} | {r['delta_max']} | {r['after']} |",
        "",
        "| authenticated completions | requests | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| at rest | {lat['rest']['n']} | {lat['rest']['p50']} | {lat['rest']['p99']} |",
        f"| under pressure | {lat['under_pressure']['n']} | {lat['under_pressure']['p50']} | {lat['under_pressure']['p99']} |",
        "",
        "What the attackers got: " + ", ".join(f"`{k}` {v}" for k, v in result["attacker_outcomes"].items()),
        "",
        f"`{result['command']}`; {result['machine']}.",
    ]
    (out / "bench_hostile.md").write_text("\n".join(md) + "\n")
    print(json.dumps({k: result[k] for k in ("rss_mb", "latency_ms")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
