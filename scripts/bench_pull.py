#!/usr/bin/env python3
"""Weights throughput: push a ~500 MB model directory to a local S3 server (nanio on 127.0.0.1), pull it into a
cold cache, verify it, and pull it again (cache hit). Writes results/bench_pull.json and results/bench_pull.md.

    python scripts/bench_pull.py [--size-mb 500] [--shards 4] [--concurrency 8] [--repeat 2]

push/pull run as ``llm-engine`` subprocesses (what an init container does); MB/s = payload bytes / wall time of
the command, process start included. The verify-only figure hashes the pulled directory against the manifest
(files in the page cache: it measures sha256 speed, not the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.manifest import MANIFEST_NAME, Manifest  # noqa: E402
from engine.weights import verify_dir  # noqa: E402
from tests.support import PY, S3Server  # noqa: E402

MB = 1_000_000


def build_model(root: Path, size_mb: int, shards: int) -> int:
    """A safetensors-like layout: config, tokenizer, N shards of random bytes, an index."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "bench": True}))
    (root / "tokenizer.json").write_bytes(os.urandom(2 * MB))
    per = (size_mb * MB - 2 * MB) // shards
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with open(root / name, "wb") as f:
            left = per
            while left:
                n = min(left, 16 * MB)
                f.write(os.urandom(n))
                left -= n
        weight_map[f"layer.{i}.weight"] = name
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(p.stat().st_size for p in root.iterdir())


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run([PY, "-m", "engine", *args], env=env, capture_output=True, text=True, cwd=str(REPO))
    secs = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"llm-engine {args[0]} failed:\n{r.stderr}")
    return secs, r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--concurrency", default="1,8", help="comma-separated pull concurrencies to measure")
    ap.add_argument("--repeat", type=int, default=2, help="cold pulls to run (best and all reported)")
    ap.add_argument("--out", default=str(REPO / "results"))
    a = ap.parse_args()

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    s3 = S3Server().wait_ready()
    try:
        model = work / "model"
        total = build_model(model, a.size_mb, a.shards)
        env = {**os.environ, **s3.env(), "PYTHONPATH": str(REPO), "ENGINE_LOG_LEVEL": "WARNING"}
        s3.client().make_bucket("bench")
        uri = "s3://bench/models/bench-500m"

        push_s, _ = run_cli(["push", str(model), uri, "--no-progress", "--concurrency", "4"], env)

        pulls = []
        n = 0
        for conc in [int(c) for c in a.concurrency.split(",")]:
            for _ in range(a.repeat):
                cache = work / f"cache-{n}"
                secs, out = run_cli(["pull", uri, "--cache-dir", str(cache), "--json", "--no-progress",
                                     "--concurrency", str(conc)], env)
                stats = json.loads(out)
                assert stats["downloaded_bytes"] == total and not stats["cache_hit"]
                pulls.append({"concurrency": conc, "wall_s": round(secs, 3), "mb_per_s": round(total / MB / secs, 1),
                              "tool_mb_per_s": stats["mb_per_s"], "object_gets": stats["object_gets"]})
                pulled = Path(stats["path"])
                last_cache = cache
                n += 1
                for old in work.glob("cache-*"):  # keep only the newest cache on disk
                    if old != last_cache:
                        shutil.rmtree(old)

        hit_s, out = run_cli(["pull", uri, "--cache-dir", str(last_cache), "--json",
                              "--no-progress"], env)
        assert json.loads(out)["cache_hit"] is True

        manifest = Manifest.from_bytes((pulled / MANIFEST_NAME).read_bytes())
        t = time.perf_counter()
        verify_dir(pulled, manifest, concurrency=2)
        verify_s = time.perf_counter() - t

        best = max(pulls, key=lambda p: p["mb_per_s"])
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.python_version()}",
            "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
            "server": "nanio 0.1.7 on 127.0.0.1 (SigV4, plain HTTP), same disk",
            "model_bytes": total,
            "files": len(manifest.files),
            "push": {"wall_s": round(push_s, 3), "mb_per_s": round(total / MB / push_s, 1)},
            "pull_cold": {"best_mb_per_s": best["mb_per_s"], "runs": pulls},
            "verify_only": {"wall_s": round(verify_s, 3), "mb_per_s": round(total / MB / verify_s, 1)},
            "pull_cache_hit": {"wall_s": round(hit_s, 3)},
        }
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_pull.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Weights push/pull throughput ({result['model_bytes'] / MB:.0f} MB, {result['files']} files)",
        "",
        f"Machine: {result['machine']}; 1-min load average {result['load_average_1m']['before']} before, "
        f"{result['load_average_1m']['after']} after (the box is shared: numbers swing with its load).",
        f"Server: {result['server']}.",
        "MB/s = payload / wall time of the `llm-engine` command (process start included); "
        "in-tool = bytes / time inside the pull (manifest GET to publish).",
        "",
        "| step | wall s | MB/s | in-tool MB/s |",
        "|---|---:|---:|---:|",
        f"| push (hash, multipart upload, manifest last) | {result['push']['wall_s']} | {result['push']['mb_per_s']} | - |",
    ]
    for p in pulls:
        md.append(f"| pull, cold cache, concurrency {p['concurrency']} (download + sha256 + fsync + publish) "
                  f"| {p['wall_s']} | {p['mb_per_s']} | {p['tool_mb_per_s']} |")
    md += [
        f"| verify only (sha256 of every file vs manifest, 2 threads) | {result['verify_only']['wall_s']} "
        f"| {result['verify_only']['mb_per_s']} | - |",
        f"| pull, cache hit (manifest GET only) | {result['pull_cache_hit']['wall_s']} | - | - |",
        "",
    ]
    (out / "bench_pull.md").write_text("\n".join(md))
    print(json.dumps(result, indent=2))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
