#!/usr/bin/env python3
"""GPU runbook helper: check the engine exporter's NVML metrics on a real GPU node.

Starts engine/metrics.py's exporter, scrapes it idle, keeps the GPU busy for a few seconds (torch matmuls,
if torch is installed), scrapes again, and writes results/gpu_metrics_check.{json,md}. Exit status 1 when
a GPU metric is missing.

    python scripts/gpu_metrics_check.py [--port 9400] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine import metrics as em  # noqa: E402


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("llm_engine_gpu_"):
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def busy(seconds: float, stop: threading.Event) -> None:
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end and not stop.is_set():
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=9400)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=str(REPO / "results"))
    args = ap.parse_args()
    server = em.start_exporter(args.port, "127.0.0.1")
    if server is None:
        print("exporter did not start", file=sys.stderr)
        return 1
    try:
        idle = scrape(args.port)
        stop = threading.Event()
        t = threading.Thread(target=busy, args=(args.seconds, stop), daemon=True)
        t.start()
        time.sleep(args.seconds * 0.75)
        loaded = scrape(args.port)
        stop.set()
        t.join()
    finally:
        server.shutdown()
    missing = [n for n in em.GPU_METRIC_NAMES if n not in loaded]
    result = {"gpu_metrics_exported": not missing, "missing": missing, "idle": idle, "under_load": loaded}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_metrics_check.json").write_text(json.dumps(result, indent=2))
    rows = ["| metric | gpu | name | idle | under load |", "|---|---|---|---|---|"]
    for n in em.GPU_METRIC_NAMES:
        for (lbl, v_load) in loaded.get(n, []):
            v_idle = next((v for l2, v in idle.get(n, []) if l2 == lbl), float("nan"))
            rows.append(f"| {n} | {lbl.get('gpu')} | {lbl.get('name')} | {v_idle:.4g} | {v_load:.4g} |")
    md = "\n".join(rows) + "\n"
    (out / "gpu_metrics_check.md").write_text(md)
    print(md)
    print(json.dumps({"gpu_metrics_exported": not missing, "missing": missing}))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
