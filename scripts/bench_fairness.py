#!/usr/bin/env python3
"""Two tenants on one engine: does a heavy tenant's flood cost a light tenant its latency?

A heavy tenant keeps ``--heavy-streams`` streams busy (closed loop) while a light tenant runs
``--light-streams`` streams of interactive requests, against each target in turn (direct vLLM, the gateway
with the fair queue off, the gateway with it on, ...), ``--rounds`` times interleaved. Every request has a
prompt of its own (random token ids, seeded by target, round, tenant and stream), so prefix caching favours
no target. Streamed ``/v1/completions``, fixed output length (``ignore_eos``).

Each measurement: the heavy streams start, ``--ramp`` seconds later the light streams start, and the next
``--duration`` seconds are the window. Throughput counts the streamed tokens that arrived in the window;
TTFT counts requests sent in the window. Then every stream is closed and the engine drains before the next
target. Writes ``--out/NAME.json`` and ``.md``.

    python scripts/bench_fairness.py --model m --vocab 26000 \
        --target direct=http://127.0.0.1:8000/v1 \
        --target fair-off=http://127.0.0.1:8080/v1,sk-heavy,sk-light \
        --target fair-on=http://127.0.0.1:8081/v1,sk-heavy,sk-light \
        --heavy-streams 256 --light-streams 4 --duration 30 --rounds 2 --name h200_fairness

``--curve 64,96,128,...`` measures the throughput-vs-concurrency curve instead: the heavy tenant alone at each
number of streams against the first target, ``--rounds`` times interleaved (total tokens/s, tokens/s per
stream, TTFT); the light tenant's tokens/s under a fair queue of N slots is about ``light streams x`` the
per-stream rate at N, so the curve shows which N meets which goal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp


@dataclass
class Req:
    sent: float
    status: int = 0
    first: float | None = None
    end: float | None = None
    # Arrival times of streamed tokens (one content event each).
    tokens: list[float] = field(default_factory=list)


@dataclass
class Tenant:
    name: str
    reqs: list[Req] = field(default_factory=list)

    def summary(self, t0: float, t1: float) -> dict:
        window = t1 - t0
        sent = [r for r in self.reqs if t0 <= r.sent < t1]
        ttft = sorted(r.first - r.sent for r in sent if r.first is not None and r.status == 200)
        toks = sum(1 for r in self.reqs for t in r.tokens if t0 <= t < t1)

        def pct(p: float) -> float | None:
            if not ttft:
                return None
            return round(ttft[min(len(ttft) - 1, int(p / 100 * len(ttft)))] * 1000, 1)

        errors: dict[str, int] = {}
        for r in sent:
            # 0: still waiting for its response when the window closed (not an error).
            if r.status not in (0, 200):
                errors[str(r.status)] = errors.get(str(r.status), 0) + 1
        return {
            "output_tok_s": round(toks / window, 1),
            "ttft_p50_ms": pct(50),
            "ttft_p90_ms": pct(90),
            "ttft_p99_ms": pct(99),
            "ttft_max_ms": round(ttft[-1] * 1000, 1) if ttft else None,
            "requests_sent": len(sent),
            "first_tokens": len(ttft),
            "errors": errors,
        }


async def stream_once(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], req: Req
) -> None:
    try:
        async with session.post(url + "/completions", data=body, headers=headers) as r:
            req.status = r.status
            if r.status != 200:
                await r.read()
                req.end = time.perf_counter()
                return
            buf = b""
            async for chunk in r.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    if ev.startswith(b"data: {") and b'"text"' in ev:
                        if req.first is None:
                            req.first = now
                        req.tokens.append(now)
    except (aiohttp.ClientError, OSError):
        req.status = req.status or -1
    req.end = time.perf_counter()


async def tenant_loop(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    key: str | None,
    cls: str | None,
    tenant: Tenant,
    seed: str,
    prompt_tokens: int,
    max_tokens: int,
    vocab: int,
    stop_at: float,
    backoff: float,
) -> None:
    rng = random.Random(seed)
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    if cls:
        headers["x-priority-class"] = cls
    while time.perf_counter() < stop_at:
        prompt = [rng.randrange(16, vocab) for _ in range(prompt_tokens)]
        body = json.dumps(
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "stream": True,
                "ignore_eos": True,
                "temperature": 0.0,
            }
        ).encode()
        req = Req(time.perf_counter())
        tenant.reqs.append(req)
        await stream_once(session, url, body, headers, req)
        if req.status != 200:
            await asyncio.sleep(backoff)  # a shed request (503) retries after a pause, as a client would


async def engine_idle(metrics_url: str | None, timeout: float = 60.0) -> None:
    """Wait until the engine runs and queues nothing (so a target does not inherit the last one's tail)."""
    if not metrics_url:
        await asyncio.sleep(3)
        return
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(metrics_url) as r:
                    text = await r.text()
                busy = 0.0
                for line in text.splitlines():
                    if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                        busy += float(line.rsplit(" ", 1)[1])
                if busy == 0:
                    return
            except (aiohttp.ClientError, OSError, ValueError):
                pass
            await asyncio.sleep(0.5)


async def measure(
    a: argparse.Namespace, name: str, url: str, heavy_key: str | None, light_key: str | None, rnd: int
) -> dict:
    heavy, light = Tenant("heavy"), Tenant("light")
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    start = time.perf_counter()
    t0 = start + a.ramp
    t1 = t0 + a.duration
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        common = dict(
            prompt_tokens=a.prompt_tokens,
            max_tokens=a.max_tokens,
            vocab=a.vocab,
            stop_at=t1,
            backoff=a.backoff,
        )
        tasks = [
            asyncio.ensure_future(
                tenant_loop(
                    session,
                    url,
                    a.model,
                    heavy_key,
                    a.heavy_class,
                    heavy,
                    f"{name}/{rnd}/heavy/{i}",
                    **common,
                )
            )
            for i in range(a.heavy_streams)
        ]
        await asyncio.sleep(a.ramp)
        tasks += [
            asyncio.ensure_future(
                tenant_loop(
                    session,
                    url,
                    a.model,
                    light_key,
                    a.light_class,
                    light,
                    f"{name}/{rnd}/light/{i}",
                    **common,
                )
            )
            for i in range(a.light_streams)
        ]
        await asyncio.sleep(max(0.0, t1 - time.perf_counter()))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    hs, ls = heavy.summary(t0, t1), light.summary(t0, t1)
    out = {"heavy": hs, "light": ls, "total_tok_s": round(hs["output_tok_s"] + ls["output_tok_s"], 1)}
    await engine_idle(a.engine_metrics)
    return out


def merge(rounds: list[dict]) -> dict:
    """Mean of the rounds' throughputs; TTFT percentiles as the worst round's (p99 over few samples is noisy)."""

    def agg(key: str, part: str | None) -> float | None:
        vals = [(r[part] if part else r)[key] for r in rounds]
        vals = [v for v in vals if v is not None]
        if not vals:
            return None
        return round(sum(vals) / len(vals), 1) if "tok_s" in key else max(vals)

    out: dict = {"total_tok_s": agg("total_tok_s", None)}
    for part in ("heavy", "light"):
        out[part] = {
            k: agg(k, part)
            for k in ("output_tok_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "ttft_max_ms")
        }
        out[part]["requests_sent"] = sum(r[part]["requests_sent"] for r in rounds)
        errs: dict[str, int] = {}
        for r in rounds:
            for k, v in r[part]["errors"].items():
                errs[k] = errs.get(k, 0) + v
        out[part]["errors"] = errs
    return out


def curve(a: argparse.Namespace, target: tuple[str, str, str | None, str | None], levels: list[int]) -> None:
    """Heavy tenant alone at each level of concurrency, interleaved over rounds; writes NAME.json/.md."""
    name, url, hk, _ = target
    runs: dict[int, list[dict]] = {n: [] for n in levels}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.light_streams = 0
    for rnd in range(a.rounds):
        for n in levels:
            a.heavy_streams = n
            r = asyncio.run(measure(a, f"{name}-c{n}", url, hk, None, rnd))
            runs[n].append(r)
            print(f"round {rnd} {name} c={n}: {json.dumps(r)}", file=sys.stderr, flush=True)
            (out / f"{a.name}.partial.json").write_text(json.dumps(runs, indent=1))
    rows = {}
    for n, rs in runs.items():
        m = merge(rs)
        h = m["heavy"]
        rows[n] = {
            "streams": n,
            "total_tok_s": m["total_tok_s"],
            "per_stream_tok_s": round((m["total_tok_s"] or 0) / n, 1),
            "ttft_p50_ms": h["ttft_p50_ms"],
            "ttft_p99_ms": h["ttft_p99_ms"],
            "errors": h["errors"],
        }
    best = max((r["total_tok_s"] or 0) for r in rows.values()) or 1
    top = rows[max(rows)]["total_tok_s"] or 1
    for r in rows.values():
        r["vs_best"] = round((r["total_tok_s"] or 0) / best, 3)
        r["vs_highest_streams"] = round((r["total_tok_s"] or 0) / top, 3)
    res = {
        "name": a.name,
        "title": a.title,
        "machine": a.machine,
        "notes": a.notes,
        "model": a.model,
        "target": name,
        "prompt_tokens": a.prompt_tokens,
        "max_tokens": a.max_tokens,
        "duration_s": a.duration,
        "ramp_s": a.ramp,
        "rounds": a.rounds,
        "curve": list(rows.values()),
        "per_round": {str(n): rs for n, rs in runs.items()},
    }
    (out / f"{a.name}.partial.json").unlink(missing_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=2))
    md = [
        f"### {a.title or a.name}",
        "",
        f"Machine: {a.machine}. Model: {a.model}. One tenant, N concurrent streams (closed loop) to {name}; prompt "
        f"{a.prompt_tokens} tokens (distinct per request), output {a.max_tokens} tokens (ignore_eos), streamed. "
        f"{a.rounds} interleaved round(s) of {a.duration:g} s (after a {a.ramp:g} s ramp); throughput = mean of "
        "rounds, TTFT percentiles = worst round. Per stream = total / N: what each sequence (a light tenant's "
        "too, under a fair queue of N slots) gets.",
        "",
    ]
    if a.notes:
        md += [a.notes, ""]
    md += [
        f"| streams N | total tok/s | vs {max(rows)} streams | tok/s per stream | TTFT p50 / p99 (ms) | errors |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        md.append(
            f"| {r['streams']} | {r['total_tok_s']} | {r['vs_highest_streams']} | {r['per_stream_tok_s']} | "
            f"{r['ttft_p50_ms']} / {r['ttft_p99_ms']} | {r['errors'] or 0} |"
        )
    (out / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--target",
        action="append",
        required=True,
        help="name=base_url[,heavy_key,light_key]; the first is the baseline",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--vocab", type=int, required=True, help="token ids are drawn from [16, vocab)")
    p.add_argument("--heavy-streams", type=int, default=256)
    p.add_argument("--light-streams", type=int, default=4)
    p.add_argument(
        "--heavy-class", default=None, help="X-Priority-Class of the heavy tenant (gateway targets)"
    )
    p.add_argument("--light-class", default="interactive", help="X-Priority-Class of the light tenant")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--ramp", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backoff", type=float, default=0.5, help="pause after a refused request (seconds)")
    p.add_argument(
        "--engine-metrics",
        default=None,
        help="the engine's /metrics URL: wait for it to drain between targets",
    )
    p.add_argument(
        "--curve",
        default="",
        help="comma-separated stream counts: the heavy tenant alone at each, against the first target",
    )
    p.add_argument("--name", default="fairness")
    p.add_argument("--title", default="")
    p.add_argument("--machine", default="")
    p.add_argument("--notes", default="")
    p.add_argument("--out", default="results")
    a = p.parse_args()
    targets = []
    for t in a.target:
        name, _, rest = t.partition("=")
        parts = rest.split(",")
        url = parts[0].rstrip("/")
        heavy_key = parts[1] if len(parts) > 1 and parts[1] else None
        light_key = parts[2] if len(parts) > 2 and parts[2] else heavy_key
        targets.append((name, url, heavy_key, light_key))
    if a.curve:
        curve(a, targets[0], [int(x) for x in a.curve.split(",") if x.strip()])
        return
    runs: dict[str, list[dict]] = {t[0]: [] for t in targets}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for rnd in range(a.rounds):
        for name, url, hk, lk in targets:
            r = asyncio.run(measure(a, name, url, hk, lk, rnd))
            runs[name].append(r)
            print(f"round {rnd} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
            # What is measured so far survives a run cut short.
            (out / f"{a.name}.partial.json").write_text(json.dumps(runs, indent=1))
    rows = {name: merge(rs) for name, rs in runs.items()}
    base = rows[targets[0][0]]["total_tok_s"] or 0
    for name in rows:
        rows[name]["total_vs_baseline"] = round(rows[name]["total_tok_s"] / base, 3) if base else None
    res = {
        "name": a.name,
        "title": a.title,
        "machine": a.machine,
        "notes": a.notes,
        "model": a.model,
        "prompt_tokens": a.prompt_tokens,
        "max_tokens": a.max_tokens,
        "heavy_streams": a.heavy_streams,
        "light_streams": a.light_streams,
        "heavy_class": a.heavy_class,
        "light_class": a.light_class,
        "duration_s": a.duration,
        "ramp_s": a.ramp,
        "rounds": a.rounds,
        "targets": [t[0] for t in targets],
        "summary": rows,
        "per_round": runs,
    }
    (out / f"{a.name}.partial.json").unlink(missing_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=2))
    md = [
        f"### {a.title or a.name}",
        "",
        f"Machine: {a.machine}. Model: {a.model}. Prompt {a.prompt_tokens} tokens (distinct per request), output "
        f"{a.max_tokens} tokens (ignore_eos), streamed. Heavy tenant: {a.heavy_streams} streams"
        f"{' (class ' + a.heavy_class + ')' if a.heavy_class else ''}; light tenant: {a.light_streams} streams "
        f"(class {a.light_class}). {a.rounds} interleaved rounds of {a.duration:g} s (after a {a.ramp:g} s ramp); "
        "throughput = mean of rounds, TTFT percentiles = worst round.",
        "",
    ]
    if a.notes:
        md += [a.notes, ""]
    md += [
        "| target | light TTFT p50 / p99 (ms) | light tok/s | heavy TTFT p50 / p99 (ms) | heavy tok/s | total tok/s (vs first) | errors heavy / light |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        h, l_ = r["heavy"], r["light"]
        md.append(
            f"| {name} | {l_['ttft_p50_ms']} / {l_['ttft_p99_ms']} | {l_['output_tok_s']} | {h['ttft_p50_ms']} / {h['ttft_p99_ms']} | "
            f"{h['output_tok_s']} | {r['total_tok_s']} ({r['total_vs_baseline']}) | {h['errors'] or 0} / {l_['errors'] or 0} |"
        )
    (out / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
