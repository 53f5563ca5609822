#!/usr/bin/env python3
"""The gateway's overhead, measured two ways; numbers go to results/bench_overhead.{json,md}.

1. Real engine: the same streamed requests sent directly to a vLLM engine and through the gateway,
   interleaved (direct, gateway, direct, gateway ...) at each concurrency: TTFT and end-to-end p50/p99 and
   the ratio. By default it starts a vLLM CPU engine on the tiny test model; ``--engine-url`` uses yours.
2. Simulated upstream (streams 256 small chunks per response, like vLLM): requests/s of ONE gateway core at
   saturation, gateway CPU per request, and the added p50/p99 latency versus going to the upstream directly.
   The gateway is pinned to CPU 0; upstream and load generator share CPU 1.

    python scripts/bench_overhead.py [--skip-engine] [--skip-sim] [--concurrency 1,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from loadgen import run_load  # noqa: E402

KEY = "sk-bench-overhead"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} not ready after {timeout}s")


def start(cmd: list[str], env: dict[str, str] | None = None, cpus: set[int] | None = None, log: str = "proc") -> subprocess.Popen:
    full = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    out = open(Path(tempfile.gettempdir()) / f"bench-{log}.log", "wb")
    p = subprocess.Popen(cmd, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(p.pid, cpus)
        except OSError:
            pass
    return p


def stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(upstream: str, model: str, cpus: set[int] | None = None, extra_cfg: str = "") -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = Path(tempfile.mkdtemp()) / "gw.yaml"
    cfg.write_text(
        f"models:\n  - name: {model}\n    upstreams: [\"{upstream}\"]\n"
        f"api_keys:\n  - id: bench\n    sha256: {hashlib.sha256(KEY.encode()).hexdigest()}\n    tenant: bench\n"
        + extra_cfg
    )
    p = start([sys.executable, "-m", "gateway", "serve"], {"GATEWAY_CONFIG": str(cfg), "GATEWAY_PORT": str(port), "GATEWAY_METRICS_PORT": str(free_port()), "GATEWAY_LOG_LEVEL": "warning"}, cpus, "gateway")
    wait_ok(f"http://127.0.0.1:{port}/readyz", 60, p)
    return p, f"http://127.0.0.1:{port}"


def engine_part(args, results: dict) -> None:
    own = None
    if args.engine_url:
        eng_url, model, vocab = args.engine_url.rstrip("/"), args.model, args.vocab
    else:
        from engine.testmodel import build_test_model

        model_dir = build_test_model(ROOT / ".cache" / "tests" / "tiny-seed0", seed=0)
        port = free_port()
        tmp = tempfile.mkdtemp(prefix="bench-vllm-")
        own = start(
            [sys.executable, "-m", "engine", "run"],
            {
                "ENGINE_MODEL": str(model_dir), "ENGINE_SERVED_MODEL_NAME": "tiny", "ENGINE_PORT": str(port),
                "ENGINE_CPU_KV_CACHE": "256M", "ENGINE_MAX_MODEL_LEN": "1024", "ENGINE_MAX_NUM_SEQS": "64",
                "TMPDIR": tmp, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            },
            log="engine",
        )
        eng_url, model, vocab = f"http://127.0.0.1:{port}", "tiny", 4000
        print("starting vLLM CPU engine ...", file=sys.stderr)
        wait_ok(eng_url + "/health", 600, own)
    gw, gw_url = start_gateway(eng_url, model)
    rows = []
    try:
        for c in args.concurrency:
            n = max(c * args.rounds_per_level, 8)
            per = {"direct": [], "gateway": []}
            for rnd in range(args.rounds):
                for label, base, key in (("direct", eng_url + "/v1", None), ("gateway", gw_url + "/v1", KEY)):
                    r = asyncio.run(run_load(label, base, model, concurrency=c, requests=n, prompt_tokens=args.prompt_tokens,
                                             max_tokens=args.max_tokens, vocab=vocab, api_key=key, seed=rnd))
                    per[label].append(r)
            row = {"concurrency": c}
            for label, runs in per.items():
                samples = [s for r in runs for s in r.samples]
                merged = runs[0].__class__(label, c, sum(r.wall for r in runs), samples)
                row[label] = merged.summary()
            d, g = row["direct"], row["gateway"]
            row["throughput_ratio"] = round(g["output_tok_per_s"] / d["output_tok_per_s"], 3) if d["output_tok_per_s"] else None
            row["ttft_p50_added_ms"] = round((g["ttft_p50_ms"] or 0) - (d["ttft_p50_ms"] or 0), 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        stop(gw)
        if own:
            stop(own)
    results["engine"] = {"engine_url": "own vLLM CPU engine, tiny model" if own else eng_url, "prompt_tokens": args.prompt_tokens,
                         "max_tokens": args.max_tokens, "rows": rows}


def sim_part(args, results: dict) -> None:
    sim_port = free_port()
    sim = start([sys.executable, str(ROOT / "scripts" / "sim_upstream.py"), "--port", str(sim_port), "--chunks", "256"], cpus={1}, log="sim")
    sim_url = f"http://127.0.0.1:{sim_port}"
    wait_ok(sim_url + "/health", 30, sim)
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {1})
        except OSError:
            pass
    gw, gw_url = start_gateway(sim_url, "sim", cpus={0})
    rows = []
    try:
        for c in args.sim_concurrency:
            n = args.sim_requests
            for label, base, key in (("direct", sim_url + "/v1", None), ("gateway", gw_url + "/v1", KEY)):
                cpu0 = cpu_seconds(gw.pid)
                r = asyncio.run(run_load(label, base, "sim", concurrency=c, requests=n, prompt_tokens=16, max_tokens=256,
                                         vocab=1000, api_key=key))
                cpu1 = cpu_seconds(gw.pid)
                s = r.summary()
                if label == "gateway":
                    s["gateway_cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / max(1, s["ok"]), 3)
                rows.append(s)
                print(json.dumps(s), file=sys.stderr)
    finally:
        stop(gw)
        stop(sim)
    out = []
    for c in args.sim_concurrency:
        d = next(r for r in rows if r["label"] == "direct" and r["concurrency"] == c)
        g = next(r for r in rows if r["label"] == "gateway" and r["concurrency"] == c)
        out.append({
            "concurrency": c,
            "direct_req_per_s": d["req_per_s"],
            "gateway_req_per_s": g["req_per_s"],
            "gateway_cpu_ms_per_request": g.get("gateway_cpu_ms_per_request"),
            "e2e_p50_added_ms": round(g["e2e_p50_ms"] - d["e2e_p50_ms"], 2),
            "e2e_p99_added_ms": round(g["e2e_p99_ms"] - d["e2e_p99_ms"], 2),
            "ttft_p50_added_ms": round(g["ttft_p50_ms"] - d["ttft_p50_ms"], 2),
            "errors": d["errors"] + g["errors"],
        })
    results["sim"] = {"chunks_per_response": 256, "rows": out, "raw": rows}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_overhead.json").write_text(json.dumps(results, indent=2))
    md = [f"# Gateway overhead ({results['machine']})", "", f"Command: `{results['command']}`", ""]
    if "engine" in results:
        e = results["engine"]
        md += [f"## Real engine ({e['engine_url']}; prompt {e['prompt_tokens']} tokens, output {e['max_tokens']} tokens, streamed, interleaved)", "",
               "| streams | direct tok/s | gateway tok/s | ratio | TTFT p50 direct / gw (ms) | TTFT p99 direct / gw (ms) | e2e p50 direct / gw (ms) | e2e p99 direct / gw (ms) | errors |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in e["rows"]:
            d, g = r["direct"], r["gateway"]
            md.append(f"| {r['concurrency']} | {d['output_tok_per_s']} | {g['output_tok_per_s']} | {r['throughput_ratio']} | "
                      f"{d['ttft_p50_ms']} / {g['ttft_p50_ms']} | {d['ttft_p99_ms']} / {g['ttft_p99_ms']} | {d['e2e_p50_ms']} / {g['e2e_p50_ms']} | "
                      f"{d['e2e_p99_ms']} / {g['e2e_p99_ms']} | {d['errors'] + g['errors']} |")
        md.append("")
    if "sim" in results:
        md += ["## Simulated upstream (256 SSE chunks per response; gateway pinned to one core)", "",
               "| streams | direct req/s | gateway req/s | gateway CPU ms/request | added e2e p50 (ms) | added e2e p99 (ms) | added TTFT p50 (ms) | errors |",
               "|---|---|---|---|---|---|---|---|"]
        for r in results["sim"]["rows"]:
            md.append(f"| {r['concurrency']} | {r['direct_req_per_s']} | {r['gateway_req_per_s']} | {r['gateway_cpu_ms_per_request']} | "
                      f"{r['e2e_p50_added_ms']} | {r['e2e_p99_added_ms']} | {r['ttft_p50_added_ms']} | {r['errors']} |")
    (out / "bench_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-url")
    p.add_argument("--model", default="tiny")
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per level (direct, gateway, ...)")
    p.add_argument("--rounds-per-level", type=int, default=2, help="requests per round = concurrency x this")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sim-concurrency", default="1,64")
    p.add_argument("--sim-requests", type=int, default=2000)
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--out", default=str(ROOT / "results"))
    p.add_argument("--machine", default=f"{platform.node() or 'this machine'}: {os.cpu_count()} CPU cores, {platform.machine()}")
    args = p.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.sim_concurrency = [int(x) for x in args.sim_concurrency.split(",")]
    results = {"machine": args.machine, "command": "python " + " ".join(["scripts/bench_overhead.py", *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.skip_sim:
        sim_part(args, results)
    if not args.skip_engine:
        engine_part(args, results)
    write(results, Path(args.out))


if __name__ == "__main__":
    main()
