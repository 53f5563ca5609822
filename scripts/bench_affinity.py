"""Prefix affinity on vs off, on two vLLM replicas behind the gateway: prefix-cache hit rate and TTFT.

Workload: ``--prefixes`` distinct long system prompts (a shared instruction block per "application"),
each request one of them (seeded random order) plus a unique user question, streamed, ``--max-tokens``
tokens, ``--concurrency`` clients. Each mode gets its own fresh prefixes, so the first mode's cache
contents cannot help the second. The engines' KV cache is kept small (``--kv-cache``) so that, as in
production, the replicas cannot each hold every prefix: that is where affinity matters.

Hit rate = delta(vllm:prefix_cache_hits) / delta(vllm:prefix_cache_queries) over both engines (tokens).
TTFT = client-side time to the first content chunk.

    python scripts/bench_affinity.py                      # starts two tiny-model engines itself
    python scripts/bench_affinity.py --urls http://a:8000,http://b:8000 --model tiny
Writes results/bench_affinity.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import Engine, Gateway, sha256_hex  # noqa: E402

KEY = "sk-bench-affinity"
WORDS = (
    "order invoice refund shipping parcel warranty repair battery screen account password delivery address "
    "customer policy discount voucher return exchange receipt store opening hours holiday support ticket "
    "priority escalation manager courier tracking number damaged missing replacement subscription plan"
).split()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def make_prefix(rng: random.Random, chars: int, tag: str) -> str:
    out = [f"You are the assistant of application {tag}. Follow these rules:"]
    n = len(out[0])
    i = 0
    while n < chars:
        i += 1
        s = f" Rule {i}: " + " ".join(rng.choice(WORDS) for _ in range(12)) + "."
        out.append(s)
        n += len(s)
    return "".join(out)[:chars]


def one_request(gw_url: str, model: str, system: str, question: str, max_tokens: int) -> tuple[float, int]:
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    prompt_tokens = 0
    with httpx.stream(
        "POST",
        gw_url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=300,
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if ttft is None and obj.get("choices") and obj["choices"][0].get("delta", {}).get("content"):
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                prompt_tokens = obj["usage"]["prompt_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), prompt_tokens


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def run_mode(urls: list[str], model: str, affinity: bool, args, seed: int) -> dict:
    cfg = {
        "models": [{"name": model, "upstreams": urls}],
        "api_keys": [{"id": "bench", "sha256": sha256_hex(KEY), "models": ["*"]}],
        "health_interval": 0.5,
        "routing": {
            "policy": "prefix_affinity" if affinity else "least_outstanding",
            "prefix_chars": args.key_chars,
            "load_factor": args.load_factor,
        },
    }
    gw = Gateway(cfg, name="gateway-bench").wait_ready()
    try:
        rng = random.Random(seed)
        prefixes = [make_prefix(rng, args.prefix_chars, f"{seed}-{i}") for i in range(args.prefixes)]
        work = [
            (rng.choice(prefixes), f"Question {i}: where is my {rng.choice(WORDS)}?")
            for i in range(args.requests)
        ]
        hits0 = [metric(u, "vllm:prefix_cache_hits_total") for u in urls]
        q0 = [metric(u, "vllm:prefix_cache_queries_total") for u in urls]
        n0 = [metric(u, "vllm:request_success_total") for u in urls]
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.concurrency) as ex:
            res = list(ex.map(lambda w: one_request(gw.url, model, w[0], w[1], args.max_tokens), work))
        wall = time.perf_counter() - t0
        hits = [metric(u, "vllm:prefix_cache_hits_total") - h for u, h in zip(urls, hits0, strict=False)]
        queries = [metric(u, "vllm:prefix_cache_queries_total") - q for u, q in zip(urls, q0, strict=False)]
        served = [metric(u, "vllm:request_success_total") - n for u, n in zip(urls, n0, strict=False)]
    finally:
        gw.stop()
    ttfts = [r[0] for r in res]
    return {
        "affinity": affinity,
        "requests": len(res),
        "prompt_tokens_mean": statistics.mean(r[1] for r in res),
        "prefix_cache_hit_rate": sum(hits) / sum(queries) if sum(queries) else 0.0,
        "prefix_cache_hit_tokens": sum(hits),
        "prefix_cache_query_tokens": sum(queries),
        "ttft_p50_ms": 1000 * pct(ttfts, 50),
        "ttft_p99_ms": 1000 * pct(ttfts, 99),
        "ttft_mean_ms": 1000 * statistics.mean(ttfts),
        "requests_per_replica": served,
        "wall_s": wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--urls", help="comma-separated engine base URLs (default: start two tiny-model engines)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=144)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--prefixes", type=int, default=24)
    p.add_argument("--prefix-chars", type=int, default=2400, help="length of each shared system prompt")
    p.add_argument("--key-chars", type=int, default=1024, help="gateway routing.prefix_chars")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument(
        "--load-factor", type=float, default=1.25, help="gateway routing.load_factor (bounded load)"
    )
    p.add_argument(
        "--kv-cache", default="12M", help="KV cache of each engine started here (ENGINE_CPU_KV_CACHE)"
    )
    p.add_argument("--out", default=str(REPO / "results"))
    args = p.parse_args()

    engines: list[Engine] = []
    try:
        if args.urls:
            urls = [u.rstrip("/") for u in args.urls.split(",")]
        else:
            from engine.testmodel import build_test_model

            model_dir = build_test_model(REPO / ".cache" / "tests" / "tiny-seed0", seed=0)
            engines = [
                Engine(
                    str(model_dir), served_name=args.model, extra_env={"ENGINE_CPU_KV_CACHE": args.kv_cache}
                )
                for _ in range(2)
            ]
            for e in engines:
                e.wait_ready(600)
            urls = [e.url for e in engines]
        rows = [
            run_mode(urls, args.model, False, args, seed=1),
            run_mode(urls, args.model, True, args, seed=2),
        ]
    finally:
        for e in engines:
            e.stop()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.node()} ({platform.machine()}, shared 2-core CPU box)"
        if not args.urls
        else platform.node(),
        "workload": {
            k: getattr(args, k)
            for k in (
                "requests",
                "concurrency",
                "prefixes",
                "prefix_chars",
                "key_chars",
                "max_tokens",
                "kv_cache",
                "load_factor",
            )
        },
        "engines": "2 x vLLM CPU, tiny test model" if not args.urls else urls,
    }
    (out / "bench_affinity.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [
        "# Prefix affinity on vs off (two replicas)",
        "",
        f"Workload: {args.requests} streamed chat requests, {args.concurrency} concurrent, {args.prefixes} distinct "
        f"{args.prefix_chars}-char system prompts, {args.max_tokens} output tokens; engines' KV cache {args.kv_cache} each; "
        f"bounded-load factor {args.load_factor}.",
        "",
        "| routing | prefix-cache hit rate | TTFT p50 (ms) | TTFT p99 (ms) | TTFT mean (ms) | requests per replica | prompt tokens (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'prefix affinity' if r['affinity'] else 'least outstanding'} | {100 * r['prefix_cache_hit_rate']:.1f}% | "
            f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['ttft_mean_ms']:.0f} | "
            f"{' / '.join(str(int(x)) for x in r['requests_per_replica'])} | {r['prompt_tokens_mean']:.0f} |"
        )
    lines.append("")
    lines.append(f"Machine: {meta['machine']}.")
    md = "\n".join(lines) + "\n"
    (out / "bench_affinity.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
