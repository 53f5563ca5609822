#!/usr/bin/env python
"""Benchmark of the audit log (gateway/audit/): the cost it adds to a request and what the writer sustains.

1. Added latency per request: the time of ``await AuditWriter.on_request_end(ctx)`` (what the proxy's
   ``finally`` pays per request), measured call by call while the writer task drains to a real file with
   batched fsync. p50 / p99 / max in microseconds.
2. Writer throughput: records/s from the first ``on_request_end`` until the last record was written and
   fsynced, with a bounded queue (back-pressure engaged), per content mode and fsync interval.
   1 / (records/s) is the event-loop CPU each record costs the gateway in total (it runs on the same loop).

Writes results/bench_audit.json and results/bench_audit.md and prints the table.

    python scripts/bench_audit.py [--requests 20000] [--out results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.audit.config import AuditSettings  # noqa: E402
from gateway.audit.writer import AuditWriter  # noqa: E402
from gateway.auth.principal import Principal  # noqa: E402
from gateway.context import RequestContext  # noqa: E402

PROMPT = (
    "患者王五，男，45岁，手机13812345678，身份证110101199003074514，主诉头痛三天，伴恶心。"
    "Please summarise the note and email it to dr.li@hospital.example.com; card 4111 1111 1111 1111 on file. "
    "Patient history: hypertension for 5 years, currently on medication; no known allergies. " * 2
)


def make_ctx(i: int) -> RequestContext:
    c = RequestContext(f"req-{i:012d}", "/v1/chat/completions", "POST", "10.1.2.3")
    c.principal = Principal(subject="svc-clinic", tenant="hospital-a", key_id="key-17")
    c.model = "qwen2.5-7b-instruct"
    c.stream = True
    c.max_tokens = 256
    c.body = {
        "model": c.model,
        "stream": True,
        "messages": [
            {"role": "system", "content": "You are a careful clinical assistant."},
            {"role": "user", "content": PROMPT},
        ],
    }
    c.status = 200
    c.endpoint = "http://10.0.0.5:8000"
    c.attempts = 1
    c.prompt_tokens, c.completion_tokens = 180, 256
    c.ttft, c.bytes_in, c.bytes_out = 0.041, 812, 40960
    c.finished = time.perf_counter()
    return c


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def bench_call_latency(n: int, content: str, d: str) -> dict:
    w = AuditWriter(
        AuditSettings(
            enabled=True,
            path=os.path.join(d, "lat", "audit.jsonl"),
            content=content,
            fsync_interval=1.0,
            queue_size=100_000,
            rotate_bytes=0,
            rotate_seconds=0,
        )
    )
    await w.start()
    ctxs = [make_ctx(i) for i in range(n)]
    lat: list[float] = []
    pc = time.perf_counter_ns
    for i, c in enumerate(ctxs):
        t0 = pc()
        await w.on_request_end(c)
        lat.append((pc() - t0) / 1000)
        if i % 50 == 49:
            await asyncio.sleep(0)  # let the writer run, as it would between requests
    await w.stop()
    return {
        "content": content,
        "calls": n,
        "p50_us": round(pct(lat, 50), 2),
        "p99_us": round(pct(lat, 99), 2),
        "max_us": round(max(lat), 1),
        "mean_us": round(statistics.fmean(lat), 2),
    }


async def bench_throughput(n: int, content: str, fsync: float, d: str) -> dict:
    sub = os.path.join(d, f"tp-{content}-{fsync}")
    w = AuditWriter(
        AuditSettings(
            enabled=True,
            path=os.path.join(sub, "audit.jsonl"),
            content=content,
            fsync_interval=fsync,
            queue_size=10_000,
            rotate_bytes=64 << 20,
            rotate_seconds=0,
        )
    )
    await w.start()
    ctxs = [make_ctx(i) for i in range(n)]
    t0, c0 = time.perf_counter(), time.process_time()
    for c in ctxs:
        await w.on_request_end(c)
    while w.records_written < n:
        await asyncio.sleep(0.001)
    await w._sync()  # noqa: SLF001 - count the final fsync in
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    fsyncs = w.fsyncs
    size = sum(f.stat().st_size for f in Path(sub).glob("*.jsonl"))
    await w.stop()
    return {
        "content": content,
        "fsync_interval_s": fsync,
        "records": n,
        "seconds": round(dt, 3),
        "records_per_s": round(n / dt),
        "wall_us_per_record": round(dt / n * 1e6, 1),
        "cpu_us_per_record": round(cpu / n * 1e6, 1),
        "fsyncs": fsyncs,
        "bytes_per_record": round(size / n),
        "full_waits": w.full_waits,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results"))
    ap.add_argument("--dir", default=None, help="directory for the audit files (default: a temp dir)")
    args = ap.parse_args()
    d = args.dir or tempfile.mkdtemp(prefix="bench-audit-")
    try:
        lat = [asyncio.run(bench_call_latency(args.requests, m, d)) for m in ("none", "redacted")]
        tp = [
            asyncio.run(bench_throughput(args.requests, m, f, d))
            for m, f in (("none", 1.0), ("none", 0.01), ("hash", 1.0), ("redacted", 1.0))
        ]
    finally:
        if args.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "prompt_chars": len(PROMPT),
        "observer_call_latency": lat,
        "writer_throughput": tp,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_audit.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Audit log benchmark",
        "",
        f"{result['machine']} (load average {result['load_average_1m']}); {result['when']}; `python scripts/bench_audit.py --requests {args.requests}`.",
        f"Each record: a streamed chat request with a {len(PROMPT)}-character prompt (PII in it).",
        "",
        "## Added latency per request (`await on_request_end(ctx)`, writer draining to a file meanwhile)",
        "",
        "| content mode | calls | p50 µs | p99 µs | max µs | mean µs |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['content']} | {r['calls']} | {r['p50_us']} | {r['p99_us']} | {r['max_us']} | {r['mean_us']} |"
            for r in lat
        ],
        "",
        "## Writer throughput (bounded queue of 10000, file sink, batched fsync)",
        "",
        "| content mode | fsync interval s | records | records/s | wall µs/record | CPU µs/record | fsyncs | bytes/record |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['content']} | {r['fsync_interval_s']} | {r['records']} | {r['records_per_s']} "
            f"| {r['wall_us_per_record']} | {r['cpu_us_per_record']} "
            f"| {r['fsyncs']} | {r['bytes_per_record']} |"
            for r in tp
        ],
        "",
        "The observer call only enqueues the context; building, redacting/hashing, chaining and writing the",
        "record happen in the writer task on the same event loop, so `CPU µs/record` (process CPU time, fsync",
        "threads included) is the total cost a request's audit record puts on the gateway process; records/s is",
        "the writer's ceiling on this machine (shared with other jobs while measured: see the load average).",
        "",
    ]
    (out / "bench_audit.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
