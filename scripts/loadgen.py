"""A small streaming load generator for OpenAI-compatible servers (used by the benchmark scripts).

Sends streamed ``/v1/completions`` requests with a fixed prompt length (token ids) and a fixed output length
(``ignore_eos``), ``concurrency`` at a time, and measures per request: TTFT, inter-token latency, end-to-end
latency and the token counts from ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Sample:
    ok: bool
    status: int
    ttft: float = 0.0
    e2e: float = 0.0
    itl: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class RunResult:
    label: str
    concurrency: int
    wall: float
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict:
        ok = [s for s in self.samples if s.ok]
        toks = sum(s.completion_tokens for s in ok)

        def pct(vals: list[float], p: float) -> float | None:
            if not vals:
                return None
            vals = sorted(vals)
            k = min(len(vals) - 1, max(0, int(round(p / 100 * (len(vals) - 1)))))
            return vals[k]

        ttft = [s.ttft for s in ok]
        e2e = [s.e2e for s in ok]
        itl = [s.itl for s in ok if s.itl > 0]
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": len(self.samples) - len(ok),
            "wall_s": round(self.wall, 3),
            "req_per_s": round(len(ok) / self.wall, 2) if self.wall else None,
            "output_tok_per_s": round(toks / self.wall, 1) if self.wall else None,
            "ttft_p50_ms": _ms(pct(ttft, 50)),
            "ttft_p99_ms": _ms(pct(ttft, 99)),
            "e2e_p50_ms": _ms(pct(e2e, 50)),
            "e2e_p99_ms": _ms(pct(e2e, 99)),
            "itl_p50_ms": _ms(pct(itl, 50)),
            "itl_p99_ms": _ms(pct(itl, 99)),
            "itl_mean_ms": _ms(statistics.fmean(itl)) if itl else None,
            "first_error": next((s.error for s in self.samples if not s.ok), None),
        }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def make_prompt(rng: random.Random, n_tokens: int, vocab: int) -> list[int]:
    # Skip the first ids (special tokens) so the prompt holds ordinary tokens only.
    return [rng.randrange(16, vocab) for _ in range(n_tokens)]


async def one_request(
    session: aiohttp.ClientSession, base_url: str, model: str, prompt: list[int] | str, max_tokens: int, api_key: str | None
) -> Sample:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    first = last = None
    usage = None
    try:
        async with session.post(base_url + "/completions", data=json.dumps(body), headers=headers) as r:
            if r.status != 200:
                return Sample(False, r.status, error=(await r.text())[:200])
            buf = b""
            async for chunk in r.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    if not ev.startswith(b"data: "):
                        continue
                    data = ev[6:]
                    if data == b"[DONE]":
                        continue
                    if b'"usage":{' in data:
                        obj = json.loads(data)
                        if obj.get("usage"):
                            usage = obj["usage"]
                        if not obj.get("choices"):
                            continue
                    if b'"error"' in data and b'"choices"' not in data:
                        return Sample(False, 200, error=data[:200].decode(errors="replace"))
                    if first is None:
                        first = now
                    last = now
    except Exception as e:  # connection errors count as failures, not crashes of the benchmark
        return Sample(False, 0, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if first is None or usage is None:
        return Sample(False, 200, error="no tokens or no usage in stream")
    ct = int(usage.get("completion_tokens", 0))
    itl = (last - first) / (ct - 1) if ct > 1 and last is not None else 0.0
    return Sample(True, 200, ttft=first - t0, e2e=end - t0, itl=itl, completion_tokens=ct, prompt_tokens=int(usage.get("prompt_tokens", 0)))


async def run_load(
    label: str,
    base_url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    prompt_tokens: int,
    max_tokens: int,
    vocab: int,
    api_key: str | None = None,
    seed: int | str = 0,
) -> RunResult:
    """``requests`` requests, ``concurrency`` in flight at a time (closed loop)."""
    rng = random.Random(seed)
    prompts = [make_prompt(rng, prompt_tokens, vocab) for _ in range(requests)]
    conn = aiohttp.TCPConnector(limit=concurrency + 8)
    timeout = aiohttp.ClientTimeout(total=3600, sock_read=600)
    result = RunResult(label, concurrency, 0.0)
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def worker() -> None:
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result.samples.append(await one_request(session, base_url, model, p, max_tokens, api_key))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall = time.perf_counter() - t0
    return result
