#!/usr/bin/env python3
"""Cache re-verification cost: how fast ``--verify-cache full`` re-hashes a cached model (MB/s), and what each
mode costs per start. Writes results/bench_verify.json and results/bench_verify.md.

    python scripts/bench_verify.py [--size-mb 1000] [--shards 4] [--concurrency 1,2,4] [--repeat 3] [--no-s3]

1. In process: a model of ``--size-mb`` random bytes is published into a cache the way a pull publishes it, then
   the cache check (``engine.weights._CacheCheck``, the code a pull runs) re-hashes it in ``full`` mode with each
   concurrency, with the files in the page cache ("warm") and evicted from it first ("cold": fdatasync +
   POSIX_FADV_DONTNEED on each file, which reads from the disk again without dropping anyone else's cache).
2. End to end (unless ``--no-s3``): the model is pushed to a local nanio server and pulled; then
   ``llm-engine pull --verify-cache none|size|full`` is timed as the command a start runs (process start and the
   manifest GET included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.manifest import MANIFEST_NAME, FileEntry, Manifest, digest, hash_file  # noqa: E402
from engine.weights import PullStats, _CacheCheck, _write_fingerprint  # noqa: E402

MB = 1_000_000


def build_model(root: Path, size_mb: int, shards: int) -> None:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "bench": True}))
    per = (size_mb * MB) // shards
    for i in range(shards):
        with open(root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            left = per
            while left:
                n = min(left, 16 * MB)
                f.write(os.urandom(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())


def publish(model: Path, cache: Path) -> tuple[Path, str, Manifest]:
    """Lay ``model`` out in ``cache`` as a verified pull would (models/<digest>/ + manifest + fingerprint)."""
    entries = []
    for p in sorted(model.iterdir()):
        size, sha = hash_file(p)
        entries.append(FileEntry(p.name, size, sha))
    manifest = Manifest(tuple(entries))
    data = manifest.to_bytes()
    key = digest(data)
    (model / MANIFEST_NAME).write_bytes(data)
    final = cache / "models" / key
    final.parent.mkdir(parents=True)
    os.rename(model, final)
    _write_fingerprint(cache, key, final, manifest)
    return final, key, manifest


def evict_page_cache(root: Path) -> None:
    for p in root.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def check_once(final: Path, key: str, manifest: Manifest, mode: str, concurrency: int) -> tuple[float, int]:
    stats = PullStats()
    t = time.perf_counter()
    bad = _CacheCheck(final, key, manifest, mode, concurrency, stats).run()
    secs = time.perf_counter() - t
    assert not bad, bad
    return secs, stats.rehashed_bytes


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "engine", *args], env=env, capture_output=True, text=True, cwd=str(REPO)
    )
    secs = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"llm-engine {args[0]} failed:\n{r.stderr}")
    return secs, json.loads(r.stdout) if "--json" in args else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--concurrency", default="1,2,4", help="comma-separated hashing threads to measure")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true", help="skip the end-to-end part (needs nanio)")
    ap.add_argument("--machine", default="", help="a description of the machine for the report")
    ap.add_argument("--out", default=str(REPO / "results"))
    ap.add_argument("--name", default="bench_verify", help="output file stem")
    a = ap.parse_args()

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=os.environ.get("BENCH_DIR")))
    rows = []
    cli_rows = []
    try:
        model = work / "model"
        build_model(model, a.size_mb, a.shards)
        cache = work / "cache"
        final, key, manifest = publish(model, cache)
        total = manifest.total_size

        for conc in [int(c) for c in a.concurrency.split(",")]:
            for state in ("warm", "cold"):
                runs = []
                for _ in range(a.repeat):
                    if state == "cold":
                        evict_page_cache(final)
                    else:
                        check_once(final, key, manifest, "full", conc)  # bring the files in
                    secs, nbytes = check_once(final, key, manifest, "full", conc)
                    assert nbytes == total
                    runs.append(total / MB / secs)
                rows.append(
                    {
                        "mode": "full",
                        "concurrency": conc,
                        "page_cache": state,
                        "median_mb_per_s": round(statistics.median(runs), 1),
                        "best_mb_per_s": round(max(runs), 1),
                        "runs_mb_per_s": [round(r, 1) for r in runs],
                    }
                )
        size_runs = [check_once(final, key, manifest, "size", 1)[0] for _ in range(a.repeat)]

        if not a.no_s3:
            from tests.support import S3Server

            s3 = S3Server().wait_ready()
            try:
                env = {**os.environ, **s3.env(), "PYTHONPATH": str(REPO), "ENGINE_LOG_LEVEL": "WARNING"}
                s3.client().make_bucket("bench")
                uri = "s3://bench/models/verify"
                run_cli(["push", str(final), uri, "--no-progress"], env)
                cli_cache = work / "cli-cache"
                run_cli(["pull", uri, "--cache-dir", str(cli_cache), "--json", "--no-progress"], env)
                for mode in ("none", "size", "full"):
                    times = []
                    for _ in range(a.repeat):
                        secs, out = run_cli(
                            [
                                "pull",
                                uri,
                                "--cache-dir",
                                str(cli_cache),
                                "--json",
                                "--no-progress",
                                "--verify-cache",
                                mode,
                            ],
                            env,
                        )
                        assert out["cache_hit"] and out["rehashed_bytes"] == (total if mode == "full" else 0)
                        times.append(secs)
                    cli_rows.append(
                        {
                            "mode": mode,
                            "median_wall_s": round(statistics.median(times), 3),
                            "runs_s": [round(t, 3) for t in times],
                        }
                    )
            finally:
                s3.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import ssl

    machine = a.machine or f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}"
    result = {
        "machine": machine,
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "hashlib_sha256": hashlib.sha256().name,
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "model_bytes": total,
        "files": len(manifest.files),
        "full_rehash": rows,
        "size_check_median_s": round(statistics.median(size_runs), 4),
        "cli_per_start": cli_rows,
        "command": "python scripts/bench_verify.py " + " ".join(sys.argv[1:]),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Cache re-verification ({total / MB:.0f} MB, {len(manifest.files)} files)",
        "",
        f"Machine: {machine}; Python {result['python']}, {result['openssl']}. 1-min load average "
        f"{result['load_average_1m']['before']} before, {result['load_average_1m']['after']} after.",
        f"Command: `{result['command']}`",
        "",
        "`--verify-cache full`: sha256 of every cached file (the check a pull runs, in process).",
        "",
        "| threads | page cache | median MB/s | best MB/s | runs |",
        "|---:|---|---:|---:|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['concurrency']} | {r['page_cache']} | {r['median_mb_per_s']} | {r['best_mb_per_s']} "
            f"| {', '.join(map(str, r['runs_mb_per_s']))} |"
        )
    md += [
        "",
        f"`--verify-cache size` (stat + fingerprint, no hashing): {result['size_check_median_s'] * 1000:.1f} ms.",
        "",
    ]
    if cli_rows:
        md += [
            "`llm-engine pull --verify-cache MODE` on a cache hit, as a start runs it (process start + manifest GET "
            "from nanio on 127.0.0.1 included):",
            "",
            "| mode | median wall s | runs |",
            "|---|---:|---|",
        ]
        for r in cli_rows:
            md.append(f"| {r['mode']} | {r['median_wall_s']} | {', '.join(map(str, r['runs_s']))} |")
        md.append("")
    (out / f"{a.name}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
