"""``llm-engine push`` and ``llm-engine pull``: weights to and from S3/MinIO (no torch, no vllm needed)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _env_bool(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a model directory to s3://BUCKET/PREFIX, manifest last")
    p.add_argument("local_dir")
    p.add_argument("uri", metavar="s3://BUCKET/PREFIX")
    p.add_argument("--concurrency", type=_positive, default=4, help="files uploaded in parallel (default 4)")
    p.add_argument("--part-size-mb", type=_positive, default=16, help="multipart part size in MiB (default 16, min 5)")
    p.add_argument("--force", action="store_true", help="upload every file, even those already there with the same sha256")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of a sentence")
    p.add_argument("--no-progress", action="store_true", help="no live progress line even on a terminal")
    p.set_defaults(func=_push)

    q = sub.add_parser("pull", help="download s3://BUCKET/PREFIX into the cache, verify every file, print its path")
    q.add_argument("uri", metavar="s3://BUCKET/PREFIX")
    q.add_argument("--cache-dir", default=os.environ.get("ENGINE_CACHE_DIR", "~/.cache/llm-engine"),
                   help="local cache (default: $ENGINE_CACHE_DIR or ~/.cache/llm-engine)")
    q.add_argument("--concurrency", type=_positive, default=_env_int("ENGINE_PULL_CONCURRENCY", 8),
                   help="files downloaded in parallel (default: $ENGINE_PULL_CONCURRENCY or 8)")
    q.add_argument("--max-rate-mbps", type=float, default=None, help="cap the download rate (MB/s, all files together)")
    q.add_argument("--verify-cache", default=os.environ.get("ENGINE_VERIFY_CACHE", "size"), metavar="none|size|full",
                   help="check of a cached copy before it is used: none, size (sizes + recorded mtimes; a changed "
                        "file is re-hashed), full (re-hash every file). Default: $ENGINE_VERIFY_CACHE or size")
    q.add_argument("--require-source", action="store_true", default=_env_bool("ENGINE_REQUIRE_SOURCE"),
                   help="fail when S3 cannot be reached instead of using the last verified copy in the cache "
                        "(default: $ENGINE_REQUIRE_SOURCE)")
    q.add_argument("--json", action="store_true", help="print a JSON summary (path, bytes, GETs, MB/s) instead of the path")
    q.add_argument("--no-progress", action="store_true", help="no live progress line even on a terminal")
    q.set_defaults(func=_pull)


def _push(args: argparse.Namespace) -> int:
    from engine.weights import WeightsError, push_model

    if args.part_size_mb < 5:
        print("llm-engine: error: --part-size-mb must be at least 5 (S3's minimum part size)", file=sys.stderr)
        return 2
    try:
        r = push_model(args.local_dir, args.uri, concurrency=args.concurrency, part_size=args.part_size_mb * 1024 * 1024,
                       force=args.force, live_progress=False if args.no_progress else None)
    except WeightsError as e:
        print(f"llm-engine: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llm-engine: push interrupted; the prefix has no manifest and is not a usable model", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"uri": args.uri, "manifest_sha256": r.manifest_digest, "files": len(r.manifest.files),
                          "total_bytes": r.manifest.total_size, "uploaded_files": r.uploaded_files,
                          "uploaded_bytes": r.uploaded_bytes, "skipped_files": r.skipped_files,
                          "seconds": round(r.seconds, 3)}))
    else:
        print(f"pushed {len(r.manifest.files)} files ({r.manifest.total_size} bytes; {r.uploaded_files} uploaded, "
              f"{r.skipped_files} already there) to {args.uri}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from engine.weights import VERIFY_MODES, WeightsError, pull_model

    if args.verify_cache not in VERIFY_MODES:
        print(f"llm-engine: error: --verify-cache (or ENGINE_VERIFY_CACHE) must be one of {', '.join(VERIFY_MODES)}, "
              f"not {args.verify_cache!r}", file=sys.stderr)
        return 2
    try:
        r = pull_model(args.uri, os.path.expanduser(args.cache_dir), args.concurrency,
                       max_rate=args.max_rate_mbps * 1e6 if args.max_rate_mbps else None,
                       live_progress=False if args.no_progress else None, verify_cache=args.verify_cache,
                       require_source=args.require_source)
    except WeightsError as e:
        print(f"llm-engine: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llm-engine: pull interrupted; partial files are kept and the next pull resumes them", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"path": str(r.path), "manifest_sha256": r.manifest_digest, **r.stats.as_dict()}))
    else:
        print(r.path)
    return 0
