#!/usr/bin/env python3
"""Direct-to-vLLM versus through-the-gateway, interleaved in one run, at several concurrency levels.

Fixed prompt length (random token ids) and fixed output length (``ignore_eos``), streamed
``/v1/completions``. For every level it runs each target in turn, ``--rounds`` times (direct, gateway,
direct, gateway, ...), so drift in the engine affects all targets alike. Writes ``--out/NAME.json`` and ``.md``.

    python scripts/bench_e2e.py --model llama-1b --vocab 4000 \
        --target direct=http://127.0.0.1:8000/v1 --target gateway=http://127.0.0.1:8080/v1,sk-... \
        --concurrency 1,64,256 --prompt-tokens 512 --max-tokens 256 --name h200_graphs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import RunResult, run_load  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, help="name=base_url[,api_key]; the first is the baseline")
    p.add_argument("--model", required=True)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--concurrency", default="1,64,256")
    p.add_argument("--requests-per-stream", type=int, default=2, help="requests per round = concurrency x this")
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--warmup", type=int, default=8, help="requests per target before measuring")
    p.add_argument("--name", default="bench_e2e")
    p.add_argument("--title", default="")
    p.add_argument("--machine", default="")
    p.add_argument("--out", default="results")
    a = p.parse_args()
    targets = []
    for t in a.target:
        name, _, rest = t.partition("=")
        url, _, key = rest.partition(",")
        targets.append((name, url.rstrip("/"), key or None))
    levels = [int(x) for x in a.concurrency.split(",")]

    def load(name, url, key, c, n, seed):
        return asyncio.run(run_load(name, url, a.model, concurrency=c, requests=n, prompt_tokens=a.prompt_tokens,
                                    max_tokens=a.max_tokens, vocab=a.vocab, api_key=key, seed=seed))

    # Every (level, round, target) gets prompts of its own: with prefix caching on, a target sent prompts
    # another target already ran would hit the engine's cache and look faster than it is.
    for name, url, key in targets:
        w = load(name, url, key, min(8, a.warmup), a.warmup, f"warmup/{name}")
        print(f"warmup {name}: {w.summary()['ok']}/{a.warmup} ok", file=sys.stderr)
    rows = []
    for c in levels:
        n = max(a.min_requests, c * a.requests_per_stream)
        runs: dict[str, list[RunResult]] = {name: [] for name, _, _ in targets}
        for rnd in range(a.rounds):
            for name, url, key in targets:
                runs[name].append(load(name, url, key, c, n, f"{c}/{rnd}/{name}"))
        row = {"concurrency": c, "requests_per_round": n}
        for name, rs in runs.items():
            merged = RunResult(name, c, sum(r.wall for r in rs), [s for r in rs for s in r.samples])
            row[name] = merged.summary()
        base = row[targets[0][0]]
        for name, _, _ in targets[1:]:
            s = row[name]
            s["throughput_ratio"] = round(s["output_tok_per_s"] / base["output_tok_per_s"], 4) if base["output_tok_per_s"] else None
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {
        "title": a.title, "machine": a.machine, "model": a.model, "prompt_tokens": a.prompt_tokens,
        "max_tokens": a.max_tokens, "rounds": a.rounds, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python scripts/bench_e2e.py " + " ".join(x if "sk-" not in x else x.split(",")[0] + ",<key>" for x in sys.argv[1:]),
        "targets": [t[0] for t in targets], "rows": rows,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=2))
    md = [f"### {a.title or a.name}", "", f"Machine: {a.machine}. Model: {a.model}. Prompt {a.prompt_tokens} tokens, output {a.max_tokens} tokens (ignore_eos), streamed; {a.rounds} interleaved rounds per level.", "",
          "| streams | target | output tok/s | ratio | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | e2e p99 (ms) | ok/errors |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, _, _ in targets:
            s = r[name]
            md.append(f"| {r['concurrency']} | {name} | {s['output_tok_per_s']} | {s.get('throughput_ratio', 1.0)} | {s['ttft_p50_ms']} | "
                      f"{s['ttft_p99_ms']} | {s['itl_p50_ms']} | {s['e2e_p99_ms']} | {s['ok']}/{s['errors']} |")
    (out / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
