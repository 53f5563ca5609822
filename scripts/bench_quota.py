#!/usr/bin/env python3
"""Added latency of the quota check per request (admit + settle), in-process and Redis-backed.

Calls the real admission hook (``gateway.quota.admission.QuotaAdmission``) the way the proxy does: admit at
the start of a request, settle with real usage at its end (usage differs from the reservation, so the Redis
backend really does its second round trip). A real redis-server is started on 127.0.0.1 unless
``--redis-url`` is given. Numbers go to results/bench_quota.{json,md}.

Configurations:
- ``rpm``: one bucket (the principal), requests/min only: admit = 1 script call, settle = nothing to do.
- ``full``: two buckets (principal + tenant), each with requests/min, tokens/min and max_concurrent:
  admit = 1 script call, settle = 1 script call (token correction + concurrency release).

Then the client alone, on the acquire script of ``full`` (no admission around it): the gateway's pipelined RESP
client (gateway/quota/resp.py) with 1 and 2 connections, against redis-py 5's asyncio client as the gateway
used it before (BlockingConnectionPool of 64, registered script, hiredis installed), same calls.

    python scripts/bench_quota.py [--requests 5000] [--concurrency 1,32] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from gateway.auth.principal import Principal  # noqa: E402
from gateway.context import RequestContext  # noqa: E402
from gateway.quota.admission import QuotaAdmission  # noqa: E402
from gateway.quota.config import QuotaSettings  # noqa: E402
from gateway.quota.metrics import QuotaMetrics  # noqa: E402
from gateway.quota.redis_backend import ACQUIRE_LUA  # noqa: E402

BIG = 10**9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis() -> tuple[subprocess.Popen, str, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit("bench_quota: redis-server not found (apt-get install -y redis-server)")
    port = free_port()
    d = tempfile.mkdtemp(prefix="bench-redis-")
    p = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            time.sleep(0.05)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()[2]
    return p, f"redis://127.0.0.1:{port}/0", version


def settings(backend: str, shape: str, url: str) -> QuotaSettings:
    if shape == "rpm":
        limits = {"default": {"rpm": BIG}}
    else:
        full = {"rpm": BIG, "tpm": BIG, "max_concurrent": 100_000}
        limits = {"default": full, "tenants": {"bench": full}}
    return QuotaSettings.model_validate(
        {
            "backend": backend,
            "redis_url": url,
            "key_prefix": f"bench:{os.getpid()}:{backend}:{shape}:",
            **limits,
        }
    )


def new_ctx(i: int) -> RequestContext:
    c = RequestContext("r", "/v1/chat/completions")
    c.principal = Principal(f"user-{i % 64}", tenant="bench")
    c.model = "tiny"
    c.body = {"messages": [{"role": "user", "content": "x" * 400}]}
    c.prompt_chars = 400
    c.max_tokens = 128
    return c


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


async def redis_cpu(url: str) -> float:
    """redis-server's own CPU seconds so far (user + system, from INFO cpu)."""
    from gateway.quota.resp import RedisClient

    c = RedisClient(url, timeout=5.0)
    try:
        info = (await c.execute("INFO", "cpu")).decode()
    finally:
        await c.close()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


async def run_one(adm: QuotaAdmission, requests: int, concurrency: int, url: str | None = None) -> dict:
    admit_t: list[float] = []
    settle_t: list[float] = []
    total_t: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            ctx = new_ctx(i)
            t0 = time.perf_counter()
            ticket = await adm.admit(ctx)
            t1 = time.perf_counter()
            ctx.prompt_tokens, ctx.completion_tokens, ctx.first_token_at = 97, 100, t1
            await ticket.settle(ctx)
            t2 = time.perf_counter()
            admit_t.append(t1 - t0)
            settle_t.append(t2 - t1)
            total_t.append(t2 - t0)

    # Warm-up (connections, script cache).
    for i in range(min(200, requests)):
        c = new_ctx(i)
        t = await adm.admit(c)
        await t.settle(c)
    rcpu0 = await redis_cpu(url) if url else 0.0
    start, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    rcpu = (await redis_cpu(url) - rcpu0) if url else 0.0
    ms = lambda v: round(v * 1000, 4)  # noqa: E731
    return {
        "requests": requests,
        "concurrency": concurrency,
        "checks_per_s": round(requests / wall, 1),
        # Gateway-side CPU (user + system, this process only; redis-server's own CPU is not included).
        "cpu_ms_per_check": round(cpu / requests * 1000, 4),
        # redis-server's own CPU per check (the shared state's cost on the Redis side; 0 for memory).
        "redis_cpu_ms_per_check": round(rcpu / requests * 1000, 4),
        "admit_p50_ms": ms(pct(admit_t, 0.5)),
        "admit_p99_ms": ms(pct(admit_t, 0.99)),
        "settle_p50_ms": ms(pct(settle_t, 0.5)),
        "settle_p99_ms": ms(pct(settle_t, 0.99)),
        "total_p50_ms": ms(pct(total_t, 0.5)),
        "total_p99_ms": ms(pct(total_t, 0.99)),
        "total_mean_ms": ms(statistics.fmean(total_t)),
    }


async def ping_rtt(url: str, n: int = 2000) -> dict:
    from redis.asyncio import Redis

    r = Redis.from_url(url)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        await r.ping()
        ts.append(time.perf_counter() - t0)
    await r.aclose()
    return {"ping_p50_ms": round(pct(ts, 0.5) * 1000, 4), "ping_p99_ms": round(pct(ts, 0.99) * 1000, 4)}


async def client_rows(url: str, requests: int, concurrency: list[int]) -> list[dict]:
    """CPU and wall time per acquire-script call: the RESP client vs redis-py, same keys and arguments."""
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from gateway.quota.limits import PERIOD, TOLERANCE, Bucket
    from gateway.quota.redis_backend import RedisLimiter

    prefix = f"bench:{os.getpid()}:client:"
    buckets = (Bucket("p:key:u", BIG, BIG, 100_000), Bucket("t:bench", BIG, BIG, 100_000))
    rows = []

    async def timed(call, conc: int) -> tuple[float, float]:
        for i in range(200):
            await call(i)
        counter = iter(range(requests))

        async def worker() -> None:
            for i in counter:
                await call(i)

        start, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return time.perf_counter() - start, time.process_time() - cpu0

    for conc in concurrency:
        for conns in (1, 2):
            lim = RedisLimiter(url, prefix=prefix, timeout=5.0, connections=conns)
            try:
                wall, cpu = await timed(lambda i, lim=lim: lim.acquire(buckets, 100, f"l{i}"), conc)
                for j in range(
                    0, requests, 1000
                ):  # free the concurrency slots (at most 4096 pending per connection)
                    await asyncio.gather(
                        *(lim.release(buckets, f"l{i}", 0) for i in range(j, min(j + 1000, requests)))
                    )
            finally:
                await lim.close()
            rows.append(
                {
                    "client": f"resp ({conns} conn)",
                    "concurrency": conc,
                    "calls_per_s": round(requests / wall, 1),
                    "cpu_us_per_call": round(cpu / requests * 1e6, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        pool = BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=5.0, retry=Retry(NoBackoff(), 0)
        )
        r = Redis(connection_pool=pool)
        script = r.register_script(ACQUIRE_LUA)
        keys = [prefix + b.key + sfx for b in buckets for sfx in (":r", ":t", ":c")]
        limits = [v for b in buckets for v in (b.rpm, b.tpm, b.concurrency)]
        try:
            wall, cpu = await timed(
                lambda i, script=script, keys=keys, limits=limits: script(
                    keys=keys,
                    args=[int(PERIOD * 1e6), int(TOLERANCE * 1e6), 100, f"p{i}", 900_000_000, *limits],
                ),
                conc,
            )
        finally:
            await r.aclose()
            await pool.disconnect()
        rows.append(
            {
                "client": "redis-py (pool of 64)",
                "concurrency": conc,
                "calls_per_s": round(requests / wall, 1),
                "cpu_us_per_call": round(cpu / requests * 1e6, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


async def bench(args, url: str) -> dict:
    rows = []
    if args.clients_only:
        return {
            "rows": rows,
            "clients": await client_rows(url, args.requests, args.concurrency),
            "redis_ping": await ping_rtt(url),
        }
    for backend in ("memory", "redis"):
        for shape in ("rpm", "full"):
            for conc in args.concurrency:
                adm = QuotaAdmission(settings(backend, shape, url), QuotaMetrics())
                try:
                    row = await run_one(adm, args.requests, conc, url if backend == "redis" else None)
                finally:
                    await adm.close()
                row = {"backend": backend, "limits": shape, **row}
                rows.append(row)
                print(json.dumps(row), flush=True)
    clients = await client_rows(url, args.requests, args.concurrency)
    return {"rows": rows, "clients": clients, "redis_ping": await ping_rtt(url)}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quota.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [
        f"# Quota check latency per request ({results['machine']})",
        "",
        f"Command: `{results['command']}`",
        "",
        "Added latency of admission + settlement per request, through the real hook. `rpm`: one bucket, "
        "requests/min only (Redis: 1 round trip). `full`: principal + tenant buckets with requests/min, "
        "tokens/min and max_concurrent (Redis: 1 round trip to admit, 1 to settle).",
        "",
        "| backend | limits | concurrent | checks/s | gateway CPU ms/check | redis-server CPU ms/check | admit p50 (ms) | admit p99 (ms) | settle p50 (ms) | settle p99 (ms) | admit+settle p50 (ms) | admit+settle p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        md.append(
            f"| {r['backend']} | {r['limits']} | {r['concurrency']} | {r['checks_per_s']} | {r['cpu_ms_per_check']} | "
            f"{r['redis_cpu_ms_per_check']} | {r['admit_p50_ms']} | "
            f"{r['admit_p99_ms']} | {r['settle_p50_ms']} | {r['settle_p99_ms']} | {r['total_p50_ms']} | {r['total_p99_ms']} |"
        )
    md += [
        "",
        "The client alone: the acquire script of `full` (2 buckets), gateway CPU per call (this process only).",
        "",
        "| client | concurrent | calls/s | gateway CPU µs/call |",
        "|---|---|---|---|",
    ]
    for r in results["clients"]:
        md.append(f"| {r['client']} | {r['concurrency']} | {r['calls_per_s']} | {r['cpu_us_per_call']} |")
    p = results["redis_ping"]
    md += [
        "",
        f"Redis {results['redis_version']} on 127.0.0.1, plain PING round trip: p50 {p['ping_p50_ms']} ms, p99 {p['ping_p99_ms']} ms.",
        "",
    ]
    (out / "bench_quota.md").write_text("\n".join(md))
    print("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", default="1,32", help="comma-separated numbers of concurrent requests")
    ap.add_argument("--redis-url", help="use this Redis instead of starting one")
    ap.add_argument("--machine", default=f"{platform.node()} ({os.cpu_count()} CPUs)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument(
        "--clients-only", action="store_true", help="only the client comparison (no admission rows)"
    )
    args = ap.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    proc = None
    version = "external"
    url = args.redis_url
    if url is None:
        proc, url, version = start_redis()
    try:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
            loop_name = "uvloop"
        except ImportError:
            runner = asyncio.Runner()
            loop_name = "asyncio"
        with runner:
            res = runner.run(bench(args, url))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    res.update(
        machine=args.machine,
        command="python scripts/bench_quota.py " + shlex.join(sys.argv[1:]),
        redis_version=version,
        event_loop=loop_name,
        python=platform.python_version(),
    )
    write(res, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
